# Parallelism applied to a plain model by functions: apply_tp (tensor/sequence parallel), apply_recompute.
"""Functions that transform a plain :class:`pipeloom.models.transformer.Transformer` (or a pipeline stage
holding some of its parts) in place, torchtitan style. Documented order: build the dense model, split it
into pipeline stages, ``apply_tp``, ``apply_recompute``, then data parallelism.

Structure they rely on (the models contract): ``embed`` (``.tok`` nn.Embedding, optional ``.pos``),
``blocks`` (ModuleList; ``block.attn`` with ``wq, wk, wv, wo``; ``block.mlp`` with ``fc, proj`` or
``w1, w3, w2``; norms ``attn_norm, mlp_norm``), ``head`` (``.norm``, ``.out``). A pipeline stage may hold
any subset; missing parts are skipped.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from .cross_entropy import vocab_parallel_cross_entropy
from .rng import ShardedDropout, ShardedRNG
from .tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    gather_from_sp,
    scatter_to_sp,
)

# ---------------------------------------------------------------------------------------------------------
# Tensor parallelism (arXiv 1909.08053 §3) and sequence parallelism (arXiv 2205.05198 §4.2.2).

_COLUMN = {"attn": ("wq", "wk", "wv"), "mlp": ("fc", "w1", "w3")}
_ROW = {"attn": ("wo",), "mlp": ("proj", "w2")}


class VocabParallelLoss:
    """``model.loss`` after :func:`apply_tp`: mean cross entropy of vocab-sharded logits, ignoring -100."""

    def __init__(self, group, vocab_size: int, ignore_index: int = -100):
        self.group, self.vocab_size, self.ignore_index = group, vocab_size, ignore_index

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, targets, self.group, vocab_size=self.vocab_size,
                                            ignore_index=self.ignore_index)


def _tp_group(mesh_or_group):
    if hasattr(mesh_or_group, "tp_group"):
        return mesh_or_group.tp_group
    return mesh_or_group if mesh_or_group is not None else dist.group.WORLD


def _check_model(model: nn.Module, tp: int) -> None:
    """Refuse a tp that does not divide the head counts or the MLP width, naming the values."""
    config = getattr(model, "config", None)
    sizes = {}
    if config is not None:
        sizes = {"n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads, "ffn_hidden": config.ffn_hidden}
    for block in getattr(model, "blocks", []):
        attn = block.attn
        hd = getattr(attn, "head_dim", None)
        if hd:
            sizes.setdefault("n_heads", attn.wq.out_features // hd)
            sizes.setdefault("n_kv_heads", attn.wk.out_features // hd)
        first = getattr(block.mlp, "fc", None) or getattr(block.mlp, "w1", None)
        sizes.setdefault("ffn_hidden", first.out_features)
        break
    for name, size in sizes.items():
        if size % tp:
            raise ValueError(f"tp={tp} does not divide {name}={size}; choose tp among the divisors of {size}")


def apply_tp(model: nn.Module, mesh_or_group=None, *, sequence_parallel: bool = False,
             gather_logits: bool = False, rng_seed: int | None = None) -> nn.Module:
    """Shard ``model`` in place over the tp group of ``mesh_or_group`` (a Mesh, a ProcessGroup, or None = world).

    Per block: ``wq, wk, wv`` and ``fc``/``w1, w3`` become :class:`ColumnParallelLinear` (a slice of heads /
    hidden units each, output not gathered), ``wo`` and ``proj``/``w2`` :class:`RowParallelLinear` (one
    all-reduce after attention, one after the MLP, forward and backward: arXiv 1909.08053 Fig. 3).
    ``embed.tok`` becomes a :class:`VocabParallelEmbedding`; ``head.out`` a vocab-sharded column-parallel
    linear (vocabulary padded to a multiple of tp) whose logits (B, T, ceil(V/tp)) go to
    :func:`vocab_parallel_cross_entropy` - ``model.loss`` is replaced by that - or, with
    ``gather_logits``, are gathered to (B, T, V) (inference). A tied head keeps sharing the embedding's shard.

    ``sequence_parallel`` (arXiv 2205.05198): activations between the tp regions are (B, T/tp, D); norms
    and dropout run on the slice; the block's attention and MLP inputs are all-gathered along the sequence
    (one gather for q, k and v) and the row-parallel outputs reduce-scattered. T must be divisible by tp.
    Norm weights get partial gradients: call
    :func:`~pipeloom.parallel.tensor_parallel.sync_sequence_parallel_grads` before the optimizer step.

    Dropout: on replicated activations every tp rank draws the same mask from the default generator
    (seed the ranks alike); on sharded ones - attention probabilities of this rank's heads and, with
    sequence parallelism, the residual-branch dropouts on its slice of the sequence - from its own
    :class:`~pipeloom.parallel.rng.ShardedRNG` stream (``rng_seed``, default ``torch.initial_seed()``,
    + 2718 + tp rank), as Megatron-LM does; recomputation replays both (see :func:`apply_recompute`).

    The model's weights are copied exactly from the dense model on every rank, so build (and seed) the dense
    model identically on all tp ranks first. Raises ``ValueError`` when tp does not divide the number of
    query or key/value heads or the MLP width.
    """
    group = _tp_group(mesh_or_group)
    tp = dist.get_world_size(group)
    _check_model(model, tp)
    sp = sequence_parallel
    rng = ShardedRNG.for_rank(dist.get_rank(group), rng_seed)

    embed = getattr(model, "embed", None)
    tied = False
    head = getattr(model, "head", None)
    if embed is not None and head is not None:
        tied = head.out.weight is embed.tok.weight
    if embed is not None:
        embed.tok = VocabParallelEmbedding.from_dense(embed.tok, group)
        if sp:  # the embedding (+ positions, dropout) runs on the full sequence, then each rank keeps its slice
            embed.register_forward_hook(lambda module, args, out: scatter_to_sp(out, group, 1))

    for block in getattr(model, "blocks", []):
        for part_name in ("attn", "mlp"):
            part = getattr(block, part_name)
            for name in _COLUMN[part_name]:
                if hasattr(part, name):
                    setattr(part, name, ColumnParallelLinear.from_dense(
                        getattr(part, name), group, sequence_parallel=sp, input_gathered=sp))
            for name in _ROW[part_name]:
                if hasattr(part, name):
                    setattr(part, name, RowParallelLinear.from_dense(getattr(part, name), group,
                                                                     sequence_parallel=sp))
            if sp:  # one all-gather of the (B, T/tp, D) input for all the part's column-parallel layers
                part.register_forward_pre_hook(lambda module, args: (gather_from_sp(args[0], group, 1),) + args[1:])
        if sp:
            _mark_sequence_parallel(block.attn_norm, block.mlp_norm)
        if hasattr(block.attn, "sharded_rng"):
            block.attn.sharded_rng = rng  # this rank's heads: their own attention-dropout masks
        if sp:  # the residual branches' dropouts act on this rank's slice of the sequence
            block.attn.resid_dropout = ShardedDropout(block.attn.resid_dropout.p, rng)
            block.mlp.dropout = ShardedDropout(block.mlp.dropout.p, rng)

    if head is not None:
        out = ColumnParallelLinear.from_dense(head.out, group, gather_output=gather_logits,
                                              sequence_parallel=sp, pad_to_tp=True)
        if tied:
            out.weight = model.embed.tok.weight  # the same (ceil(V/tp), D) shard of the same padded vocabulary
        head.out = out
        if sp:
            _mark_sequence_parallel(head.norm)
        if not gather_logits:
            model.loss = VocabParallelLoss(group, head.out.out_features)
    return model


def _mark_sequence_parallel(*modules: nn.Module) -> None:
    for module in modules:
        for p in module.parameters():
            p.sequence_parallel = True


# ---------------------------------------------------------------------------------------------------------
# Activation recomputation (arXiv 2205.05198 §5: full and selective).


@dataclass(frozen=True)
class RecomputePolicy:
    """Which blocks recompute what in backward.

    ``mode``: "none"; "full" (a block keeps only its input and re-runs its forward in backward);
    "selective" (only the attention core - softmax(QK^T)V, whose (B, H, T, T) intermediates dominate -
    is recomputed; arXiv 2205.05198 §5). ``every``: recompute blocks whose index is a multiple of
    ``every`` (1: all). ``layers``: explicit block indices (overrides ``every``). Indices are positions in
    ``model.blocks`` (local to a pipeline stage).
    """

    mode: str = "full"  # "none" | "full" | "selective"
    every: int = 1  # recompute block i when i % every == 0
    layers: tuple[int, ...] | None = None  # explicit block indices, overriding every

    def __post_init__(self) -> None:
        if self.mode not in ("none", "full", "selective"):
            raise ValueError(f"mode={self.mode!r} must be 'none', 'full' or 'selective'")
        if self.every < 1:
            raise ValueError(f"every={self.every} must be >= 1")

    def selects(self, index: int) -> bool:
        if self.mode == "none":
            return False
        return index in self.layers if self.layers is not None else index % self.every == 0


_ACTIVE_COUNTERS: contextvars.ContextVar[tuple] = contextvars.ContextVar("pipeloom_saved_counters", default=())


def _sharded_streams(module: nn.Module) -> list[ShardedRNG]:
    streams = {id(rng): rng for m in module.modules() if (rng := getattr(m, "sharded_rng", None)) is not None}
    return list(streams.values())


def _replay_streams(streams: list[ShardedRNG]):
    """checkpoint's ``context_fn``: remember the streams' states as the forward starts; during the
    recomputation put them back (so dropout on sharded activations draws the same masks), then return
    them to where they had got to."""
    snapshot = [rng.get_state() for rng in streams]

    @contextlib.contextmanager
    def recompute():
        current = [rng.get_state() for rng in streams]
        for rng, state in zip(streams, snapshot):
            rng.set_state(state)
        try:
            yield
        finally:
            for rng, state in zip(streams, current):
                rng.set_state(state)

    return contextlib.nullcontext(), recompute()


def _checkpointed_call(cls_forward, module, *args, **kwargs):
    """Run ``cls_forward(module, ...)`` under non-reentrant checkpointing. The default RNG state, and the
    state of every tensor-parallel dropout stream in the module, are restored for the recomputation."""
    if not torch.is_grad_enabled():
        return cls_forward(module, *args, **kwargs)
    for counter in _ACTIVE_COUNTERS.get():
        counter.held_by_checkpoint(args, kwargs)
    streams = _sharded_streams(module)
    context = {"context_fn": functools.partial(_replay_streams, streams)} if streams else {}
    return checkpoint(cls_forward, module, *args, use_reentrant=False, preserve_rng_state=True, **context,
                      **kwargs)


class _CheckpointAttentionCore(TorchFunctionMode):
    """Checkpoints every ``F.scaled_dot_product_attention`` called while active (selective recomputation)."""

    calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and torch.is_grad_enabled():
            self.calls += 1
            for counter in _ACTIVE_COUNTERS.get():
                counter.held_by_checkpoint(args, kwargs)
            return checkpoint(func, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)
        return func(*args, **kwargs)


def _selective_call(cls_forward, module, *args, **kwargs):
    with _CheckpointAttentionCore() as mode:
        out = cls_forward(module, *args, **kwargs)
    if mode.calls == 0 and torch.is_grad_enabled():
        raise RuntimeError(f"selective recomputation found no F.scaled_dot_product_attention call in "
                           f"{type(module).__name__}.forward, so nothing would be recomputed; use "
                           "RecomputePolicy('full') for this attention")
    return out


def _unpatch(module: nn.Module) -> None:
    if getattr(module, "_pipeloom_recompute", None):
        module.__dict__.pop("forward", None)
        module._pipeloom_recompute = None


def _patch(module: nn.Module, call, mode: str) -> None:
    if "forward" in module.__dict__:
        raise ValueError(f"{type(module).__name__}.forward is already replaced on this instance; "
                         "apply_recompute needs the class's own forward")
    # functools.partial of the class function (not a closure) so that copy.deepcopy(model) rebinds it.
    module.forward = functools.partial(call, type(module).forward, module)
    module._pipeloom_recompute = mode


def apply_recompute(model: nn.Module, policy: RecomputePolicy) -> list[int]:
    """Apply ``policy`` in place to ``model.blocks``, or to the blocks among ``model``'s children (a stage).

    Full: the selected blocks run under ``torch.utils.checkpoint`` (non-reentrant). Selective: each selected
    block's attention checkpoints its ``F.scaled_dot_product_attention`` call. RNG state is saved and
    restored, so dropout masks in the recomputed forward equal the first ones. Re-applying replaces the
    previous policy; ``RecomputePolicy("none")`` removes it. Parameters, names and state_dict are unchanged.
    Returns the indices of the blocks that recompute.
    """
    if hasattr(model, "blocks"):
        blocks = list(model.blocks)
    else:  # a pipeline stage: an nn.Sequential / ModuleList of layers, some of them blocks
        blocks = [m for m in model.children() if hasattr(m, "attn")]
    chosen = []
    for i, block in enumerate(blocks):
        _unpatch(block)
        _unpatch(block.attn)
        if not policy.selects(i):
            continue
        if policy.mode == "full":
            _patch(block, _checkpointed_call, "full")
        else:
            _patch(block.attn, _selective_call, "selective")
        chosen.append(i)
    return chosen


class SavedActivations:
    """Context manager counting the bytes autograd keeps for backward during a forward pass.

    Counts every tensor packed by saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``), plus the
    inputs a checkpointed region keeps to recompute from (non-reentrant checkpointing holds them itself and
    packs placeholders instead). Storages are counted once; parameters and buffers of ``model`` are not
    activations and are skipped::

        with SavedActivations(model) as saved:
            loss = model(x).sum()
        saved.bytes
    """

    def __init__(self, model: nn.Module | None = None):
        self._skip = set()
        if model is not None:
            self._skip = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
        self._storages: dict[int, int] = {}
        self._stack = contextlib.ExitStack()

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def _record(self, t) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._skip:
                self._storages[ptr] = storage.nbytes()

    def held_by_checkpoint(self, args, kwargs) -> None:
        for t in list(args) + list(kwargs.values()):
            self._record(t)

    def _pack(self, t):
        self._record(t)
        return t

    def __enter__(self):  # -> SavedActivations
        token = _ACTIVE_COUNTERS.set(_ACTIVE_COUNTERS.get() + (self,))
        self._stack.callback(_ACTIVE_COUNTERS.reset, token)
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
