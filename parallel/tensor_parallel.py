# Tensor-parallel layers (Megatron-LM, arXiv 1909.08053) and their communication as autograd functions.
"""Column- and row-parallel linears, a vocabulary-parallel embedding, and the collectives between them.

Megatron's two conjugate operators (arXiv 1909.08053 §3, Fig. 3):

* ``f`` = :func:`copy_to_tp`: identity forward, all-reduce backward (enters a column-parallel region);
* ``g`` = :func:`reduce_from_tp`: all-reduce forward, identity backward (leaves a row-parallel region).

and the split/gather pair :func:`scatter_to_tp` / :func:`gather_from_tp` along the last dimension.

Sequence parallelism (arXiv 2205.05198 §4.2.2) replaces ``f``/``g`` by ``g_bar``/``g``-style pairs along the
sequence dimension, so LayerNorm, dropout and residual adds run on a 1/tp slice of the sequence:

* :func:`gather_from_sp`: all-gather forward, reduce-scatter backward (before a column-parallel linear);
* :func:`reduce_scatter_to_sp`: reduce-scatter forward, all-gather backward (after a row-parallel linear);
* :func:`scatter_to_sp`: split forward, all-gather backward (after the embedding).

Parameters that see only a slice of the sequence under sequence parallelism (norm weights, the bias of a
row-parallel linear) get partial gradients; they are tagged ``param.sequence_parallel = True`` and
:func:`sync_sequence_parallel_grads` all-reduces them over the tp group before the optimizer step.

Sharded layers are built FROM a dense layer (``ColumnParallelLinear.from_dense(linear, group)``) so that a
sharded model is the dense model split, number for number.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ---------------------------------------------------------------------------------------------------------
# Raw collectives (no autograd) along an arbitrary dimension.


def _size(group) -> int:
    return dist.get_world_size(group)


def _rank(group) -> int:
    return dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's 1/tp chunk of ``x`` along ``dim`` (sizes must divide)."""
    n = _size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"cannot split dimension {dim} of size {x.shape[dim]} into tp={n} equal parts")
    return x.chunk(n, dim=dim)[_rank(group)].contiguous()


def _gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (all-gather)."""
    n = _size(group)
    if n == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((n * x.numel(),))
    _all_gather_single(out, x.reshape(-1), group=group)
    return torch.cat(out.view((n,) + x.shape).unbind(0), dim=dim)  # (..., n * x.shape[dim], ...)


def _reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Sum over ranks, then keep this rank's 1/tp chunk along ``dim``."""
    n = _size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"cannot reduce-scatter dimension {dim} of size {x.shape[dim]} over tp={n} ranks")
    front = x.movedim(dim, 0).contiguous()  # (S, ...)
    out = front.new_empty((front.shape[0] // n,) + front.shape[1:])
    _reduce_scatter_single(out, front, group=group)
    return out.movedim(0, dim).contiguous()


# ---------------------------------------------------------------------------------------------------------
# Autograd functions: each is its own conjugate's transpose (arXiv 1909.08053 §3; arXiv 2205.05198 §4.2.2).


class _CopyToTP(torch.autograd.Function):
    """f: identity forward, all-reduce backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    """Split forward, all-gather backward (along ``dim``)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group, ctx.dim), None, None


class _GatherFromTP(torch.autograd.Function):
    """All-gather forward, split backward (along ``dim``)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.group, ctx.dim), None, None


class _GatherFromSP(torch.autograd.Function):
    """All-gather forward, reduce-scatter backward (along the sequence ``dim``)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group, ctx.dim), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    """Reduce-scatter forward, all-gather backward (along the sequence ``dim``)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group, ctx.dim), None, None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient over ``group`` backward (Megatron's ``f``)."""
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce over ``group`` forward, identity backward (Megatron's ``g``)."""
    return _ReduceFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    """Keep this rank's chunk along ``dim`` forward; all-gather the gradient backward."""
    return _ScatterToTP.apply(x, group, dim)


def gather_from_tp(x: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    """All-gather along ``dim`` forward; keep this rank's chunk of the gradient backward."""
    return _GatherFromTP.apply(x, group, dim)


def gather_from_sp(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Sequence parallelism: all-gather the sequence forward, reduce-scatter the gradient backward."""
    return _GatherFromSP.apply(x, group, dim)


def reduce_scatter_to_sp(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Sequence parallelism: reduce-scatter along the sequence forward, all-gather the gradient backward."""
    return _ReduceScatterToSP.apply(x, group, dim)


def scatter_to_sp(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Sequence parallelism: keep this rank's slice of the sequence forward, all-gather backward."""
    return _ScatterToTP.apply(x, group, dim)


def sync_sequence_parallel_grads(model: nn.Module, group) -> int:
    """All-reduce over ``group`` the gradients of parameters tagged ``sequence_parallel``; returns how many.

    Under sequence parallelism a replicated parameter used on a slice of the sequence (norm weights, a
    row-parallel bias) gets the gradient of that slice only; the sum over the tp ranks is the full
    gradient (arXiv 2205.05198 §4.2.2). Call after backward, before the optimizer step.
    """
    grads = [p.grad for p in model.parameters() if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if grads and _size(group) > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        for g, new in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(new.view_as(g))
    return len(grads)


# ---------------------------------------------------------------------------------------------------------
# Layers.


def _shard_rows(weight: torch.Tensor, n: int, rank: int, padded_rows: int) -> torch.Tensor:
    """Rows ``[rank*per, (rank+1)*per)`` of ``weight`` zero-padded to ``padded_rows`` rows in total."""
    if padded_rows > weight.shape[0]:
        pad = weight.new_zeros((padded_rows - weight.shape[0],) + weight.shape[1:])
        weight = torch.cat([weight, pad])
    return weight.chunk(n, dim=0)[rank].clone()


class ColumnParallelLinear(nn.Module):
    """``y = x A^T + b`` with ``A`` split by output rows: rank r holds ``A[r*O/tp:(r+1)*O/tp]`` (arXiv 1909.08053).

    Input: the full ``x`` (B, T, I) - or, with ``sequence_parallel``, this rank's slice (B, T/tp, I),
    all-gathered along the sequence first. Output: this rank's slice of the features (B, T, O/tp), or
    with ``gather_output`` the full (B, T, O). ``padded_out_features`` (a multiple of tp, used for
    vocabularies) appends zero rows that a gathered output drops again.
    """

    def __init__(self, in_features: int, out_features: int, group, bias: bool = True,
                 gather_output: bool = False, sequence_parallel: bool = False, seq_dim: int = 1,
                 pad_to_tp: bool = False, input_gathered: bool = False, device=None, dtype=None):
        super().__init__()
        if input_gathered and not sequence_parallel:
            raise ValueError("input_gathered=True only makes sense with sequence_parallel=True")
        self.group = group
        # With sequence parallelism, several layers reading the same input (q, k, v) can share one
        # gather_from_sp done by the caller: input_gathered=True then skips this layer's own gather.
        self.input_gathered = input_gathered
        self.tp = _size(group)
        if out_features % self.tp and not pad_to_tp:
            raise ValueError(
                f"tp={self.tp} does not divide out_features={out_features}; choose tp among its divisors "
                "(or pad_to_tp=True for a vocabulary)"
            )
        self.in_features = in_features
        self.out_features = out_features  # the dense layer's width
        self.padded_out_features = self.tp * math.ceil(out_features / self.tp)
        self.local_out_features = self.padded_out_features // self.tp
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.seq_dim = seq_dim
        self.weight = nn.Parameter(torch.empty(self.local_out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(self.local_out_features, device=device, dtype=dtype)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    @classmethod
    def from_dense(cls, linear: nn.Linear, group, gather_output: bool = False, sequence_parallel: bool = False,
                   seq_dim: int = 1, pad_to_tp: bool = False, input_gathered: bool = False) -> ColumnParallelLinear:
        """This rank's shard of ``linear`` (its rows of weight and bias), copied exactly."""
        layer = cls(linear.in_features, linear.out_features, group, bias=linear.bias is not None,
                    gather_output=gather_output, sequence_parallel=sequence_parallel, seq_dim=seq_dim,
                    pad_to_tp=pad_to_tp, input_gathered=input_gathered, device=linear.weight.device,
                    dtype=linear.weight.dtype)
        rank = _rank(group)
        with torch.no_grad():
            layer.weight.copy_(_shard_rows(linear.weight, layer.tp, rank, layer.padded_out_features))
            if linear.bias is not None:
                layer.bias.copy_(_shard_rows(linear.bias, layer.tp, rank, layer.padded_out_features))
        return layer

    @property
    def vocab_start(self) -> int:
        """First global output index held by this rank."""
        return _rank(self.group) * self.local_out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            if not self.input_gathered:
                x = gather_from_sp(x, self.group, self.seq_dim)  # (B, T/tp, I) -> (B, T, I)
        else:
            x = copy_to_tp(x, self.group)  # (B, T, I), gradient all-reduced backward
        y = F.linear(x, self.weight, self.bias)  # (B, T, O/tp)
        if self.gather_output:
            y = gather_from_tp(y, self.group, dim=-1)[..., : self.out_features]  # (B, T, O)
        return y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features} (local {self.local_out_features}), tp={self.tp}, "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """``y = x A^T + b`` with ``A`` split by input columns: rank r holds ``A[:, r*I/tp:(r+1)*I/tp]``.

    Input: this rank's slice of the features (B, T, I/tp) (``input_is_parallel``, the output of a
    column-parallel layer) or the full (B, T, I), split here. The partial products are all-reduced -
    or, with ``sequence_parallel``, reduce-scattered to this rank's slice of the sequence (B, T/tp, O).
    The bias is added once, after the reduction.
    """

    def __init__(self, in_features: int, out_features: int, group, bias: bool = True,
                 input_is_parallel: bool = True, sequence_parallel: bool = False, seq_dim: int = 1,
                 device=None, dtype=None):
        super().__init__()
        self.group = group
        self.tp = _size(group)
        if in_features % self.tp:
            raise ValueError(f"tp={self.tp} does not divide in_features={in_features}; choose tp among its divisors")
        self.in_features = in_features
        self.out_features = out_features
        self.local_in_features = in_features // self.tp
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.seq_dim = seq_dim
        self.weight = nn.Parameter(torch.empty(out_features, self.local_in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        if self.bias is not None and sequence_parallel:
            self.bias.sequence_parallel = True  # sees one slice of the sequence: grads need a tp all-reduce
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    @classmethod
    def from_dense(cls, linear: nn.Linear, group, input_is_parallel: bool = True, sequence_parallel: bool = False,
                   seq_dim: int = 1) -> RowParallelLinear:
        """This rank's shard of ``linear`` (its columns of weight; the whole bias), copied exactly."""
        layer = cls(linear.in_features, linear.out_features, group, bias=linear.bias is not None,
                    input_is_parallel=input_is_parallel, sequence_parallel=sequence_parallel, seq_dim=seq_dim,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight.chunk(layer.tp, dim=1)[_rank(group)])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group, dim=-1)  # (B, T, I) -> (B, T, I/tp)
        y = F.linear(x, self.weight)  # (B, T, O), partial sum over this rank's inputs
        if self.sequence_parallel:
            y = reduce_scatter_to_sp(y, self.group, self.seq_dim)  # (B, T/tp, O)
        else:
            y = reduce_from_tp(y, self.group)  # (B, T, O)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features} (local {self.local_in_features}), out={self.out_features}, tp={self.tp}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split by rows: rank r holds ids ``[r*V/tp, (r+1)*V/tp)`` (arXiv 1909.08053 §3).

    Ids outside this rank's range look up zeros; the all-reduce over the tp group sums the one rank's
    hit into the full (B, T, D) embedding (or, with ``sequence_parallel``, reduce-scatters it to
    (B, T/tp, D)). A vocabulary not divisible by tp is padded with zero rows that no id reaches; the
    padded shard has the same rows as a ``pad_to_tp`` :class:`ColumnParallelLinear` head, so a tied
    head can share this weight.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group, sequence_parallel: bool = False,
                 seq_dim: int = 1, device=None, dtype=None):
        super().__init__()
        self.group = group
        self.tp = _size(group)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padded_num_embeddings = self.tp * math.ceil(num_embeddings / self.tp)
        self.local_num_embeddings = self.padded_num_embeddings // self.tp
        self.vocab_start = _rank(group) * self.local_num_embeddings
        self.sequence_parallel = sequence_parallel
        self.seq_dim = seq_dim
        self.weight = nn.Parameter(torch.empty(self.local_num_embeddings, embedding_dim, device=device, dtype=dtype))
        nn.init.normal_(self.weight)

    @classmethod
    def from_dense(cls, embedding: nn.Embedding, group, sequence_parallel: bool = False,
                   seq_dim: int = 1) -> VocabParallelEmbedding:
        """This rank's rows of ``embedding``, copied exactly (zero rows where the vocabulary is padded)."""
        if embedding.padding_idx is not None or embedding.max_norm is not None:
            raise ValueError("VocabParallelEmbedding supports neither padding_idx nor max_norm; build a plain "
                             "nn.Embedding(num, dim) model")
        w = embedding.weight
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, group, sequence_parallel=sequence_parallel,
                    seq_dim=seq_dim, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.weight.copy_(_shard_rows(w, layer.tp, _rank(group), layer.padded_num_embeddings))
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start  # (B, T)
        outside = (local < 0) | (local >= self.local_num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, T, D)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sp(out, self.group, self.seq_dim)  # (B, T/tp, D)
        return reduce_from_tp(out, self.group)  # (B, T, D)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim} (local rows {self.local_num_embeddings} "
                f"from {self.vocab_start}), tp={self.tp}")
