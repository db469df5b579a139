# Building blocks of the transformer: norms, rotary positions, attention, MLPs and the Block.
"""Layers that ``pipeloom.parallel`` can swap or shard.

Where :func:`pipeloom.kernels.worth_fusing` allows (a CUDA GPU with triton, tensors large enough for a
fused kernel to pay for its launch, not inside ``torch.compile``, and not switched off with
``pipeloom.kernels.set_kernels("torch")`` or the launcher's ``model.kernels=torch``), RMSNorm, the rotary
embedding and SwiGLU run pipeloom's fused Triton kernels (in eager torch each is several kernels); elsewhere
(CPU, float64) the torch code below. LayerNorm is torch's own fused kernel (see :func:`make_norm`). Inference
(a :mod:`.kv` paged batch) rotates q and k in one launch with the tables read at the batch's positions (in a
fused decode step, inside the paged decode kernel), and
:meth:`Block.forward_residual` carries the residual stream apart so that each residual add fuses with the next
RMSNorm (:func:`add_norm`); the inference runner's decode graphs enter :func:`pipeloom.kernels.always_fuse`.

Attention keeps four separate projections ``wq, wk, wv, wo`` (no fused qkv) and reads its head counts
from the projections' output widths at forward time, so a tensor-parallel pass that replaces ``wq/wk/wv``
with column-parallel linears holding a slice of heads (and ``wo`` with a row-parallel one) needs no other
change. The MLPs keep ``fc/proj`` (GPT) and ``w1/w3/w2`` (Llama) for the same reason.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeloom import kernels
from pipeloom.kernels.add_rmsnorm import add_rmsnorm as fused_add_rmsnorm
from pipeloom.kernels.rmsnorm import rmsnorm as fused_rmsnorm
from pipeloom.kernels.rotary import rotary as fused_rotary
from pipeloom.kernels.rotary import rotary_qk as fused_rotary_qk
from pipeloom.kernels.swiglu import swiglu as fused_swiglu

from . import kv
from .config import ModelConfig

INIT_STD = 0.02  # GPT-2's initializer range


class RMSNorm(nn.Module):
    """Root-mean-square norm (arXiv 1910.07467), computed in float32 as Hugging Face Llama does."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.worth_fusing(x) and x.dtype == self.weight.dtype:
            return fused_rmsnorm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()  # (..., D)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def add_norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, norm(s)) for s = x + residual (``residual`` None: s = x), x (..., D): one fused kernel
    (:func:`pipeloom.kernels.add_rmsnorm.add_rmsnorm`) for an RMSNorm where :func:`pipeloom.kernels.worth_fusing`
    allows, else the add and ``norm`` as they are (the numbers of an unfused block)."""
    if residual is None:
        return x, norm(x)
    if type(norm) is RMSNorm and x.dtype == norm.weight.dtype == residual.dtype and kernels.worth_fusing(x):
        return fused_add_rmsnorm(x, residual, norm.weight, norm.eps)
    s = residual + x  # (..., D), added in the order Block.forward adds
    return s, norm(s)


def make_norm(config: ModelConfig) -> nn.Module:
    """LayerNorm (gpt, with bias when ``config.bias``) or RMSNorm (llama).

    LayerNorm stays torch's: ``F.layer_norm`` is already one fused CUDA kernel, and pipeloom's Triton
    LayerNorm made GPT training slower in the launcher on an H100 (D=768: 310-347k against 399-421k
    tokens/s over three alternating rounds, bench/RESULTS.md). The kernel remains available as
    :func:`pipeloom.kernels.layernorm.layernorm`.
    """
    if config.family == "gpt":
        return nn.LayerNorm(config.dim, eps=config.norm_eps, bias=config.bias)
    return RMSNorm(config.dim, eps=config.norm_eps)


# ----------------------------------------------------------------------------- rotary positions


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies theta^(-2i/d), i < d/2 (RoFormer, arXiv 2104.09864), float32, (hd/2,).

    With ``rope_scaling`` of type "llama3", low frequencies are divided by ``factor`` and the middle band
    interpolated, as in Llama 3.1 (the same formula as Hugging Face's ``_compute_llama3_parameters``).
    """
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    if config.rope_scaling is None:
        return inv_freq
    s = config.rope_scaling
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cache(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_seq_len, head_dim), float32, in the "rotate_half" layout.

    The layout pairs dimension i with i + hd/2 (GPT-NeoX / Hugging Face Llama), not 2i with 2i+1
    (Meta's original complex-number form), so Hugging Face Llama weights load without permuting q/k.
    """
    inv_freq = rope_inv_freq(config)  # (hd/2,)
    t = torch.arange(config.max_seq_len, dtype=torch.int64).float()  # (T,)
    freqs = torch.outer(t, inv_freq)  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, hd) by position: x*cos + rotate_half(x)*sin, with cos/sin (T, hd)."""
    cos = cos[None, :, None, :]  # (1, T, 1, hd)
    sin = sin[None, :, None, :]
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------- attention


class Attention(nn.Module):
    """Causal self-attention with separate q/k/v/o projections and grouped-query attention.

    The number of query heads and key/value heads is read from the projection outputs at forward time
    (``wq(x).shape[-1] // head_dim``, ``wk(x).shape[-1] // head_dim``), so this module runs any
    contiguous slice of heads when ``wq/wk/wv`` hold that slice (tensor parallelism, arXiv 1909.08053 §3).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.attn_dropout_p = config.dropout
        self.rotary = config.family == "llama"
        self.config = config
        d, hd = config.dim, config.head_dim
        self.wq = nn.Linear(d, config.n_heads * hd, bias=config.bias)
        self.wk = nn.Linear(d, config.n_kv_heads * hd, bias=config.bias)
        self.wv = nn.Linear(d, config.n_kv_heads * hd, bias=config.bias)
        self.wo = nn.Linear(config.n_heads * hd, d, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # Under tensor parallelism this rank's heads draw attention dropout from their own stream
        # (a pipeloom.parallel.rng.ShardedRNG, set by apply_tp); None: the default generator.
        self.sharded_rng = None
        if self.rotary:
            cos, sin = rope_cache(config)
            self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, hd)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape  # (B, T, D)
        hd = self.head_dim
        paged = kv.current()  # an inference batch over the paged KV cache (models/kv.py), or None
        q, k, v = (paged is not None and paged.project(self, x)) or self._project(x)
        q = q.view(B, T, -1, hd)  # (B, T, Hq, hd), Hq local query heads
        k = k.view(B, T, -1, hd)  # (B, T, Hkv, hd)
        v = v.view(B, T, -1, hd)  # (B, T, Hkv, hd)
        n_heads, n_kv = q.size(2), k.size(2)
        if n_heads % n_kv:
            raise ValueError(
                f"attention has {n_heads} query heads but {n_kv} key/value heads; "
                "query heads must be a multiple of key/value heads"
            )
        rope = None  # rotary tables the paged attention applies itself
        if self.rotary:
            if paged is None:
                cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, hd)
                rotate = fused_rotary if kernels.worth_fusing(q) else apply_rotary
                q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            elif paged.decode_splits is not None and not paged.prewrite and kernels.worth_fusing(q):
                rope = (self.rope_cos, self.rope_sin)  # a fused decode step: the decode kernel rotates q and k
            elif kernels.worth_fusing(q):  # one launch for q and k, each token's table row read at its position
                q, k = fused_rotary_qk(q, k, self.rope_cos, self.rope_sin, paged.positions)
            else:
                cos, sin = paged.rope_rows(self.rope_cos, self.rope_sin)  # (N, hd), gathered once per batch
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if paged is not None:  # B = 1, T = N flattened new tokens: write K/V into the cache, attend over it
            y = paged.attend(self, q[0], k[0], v[0], rope)  # (N, Hq, hd)
            return self.resid_dropout(self.wo(y.reshape(B, T, n_heads * hd)))  # (1, N, D)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if n_kv != n_heads:  # GQA: query head h reads key/value head h // (Hq/Hkv)
            k = k.repeat_interleave(n_heads // n_kv, dim=1)  # (B, Hq, T, hd)
            v = v.repeat_interleave(n_heads // n_kv, dim=1)
        dropout_p = self.attn_dropout_p if self.training else 0.0
        rng = self.sharded_rng
        with rng.fork(q.device) if rng is not None and dropout_p > 0 else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)  # (B, Hq, T, hd)
        y = y.transpose(1, 2).reshape(B, T, n_heads * hd)  # (B, T, Hq*hd)
        return self.resid_dropout(self.wo(y))  # (B, T, D)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v projections. Plain linears run as ONE matmul over their concatenated weights (one
        large GEMM instead of three, as a fused qkv layer would, while the parameters keep their names);
        replaced modules (tensor-parallel linears, whose forward carries communication, quantized layers) and
        linears whose weight is a tensor subclass (torchao's quantized weights) run their own."""
        wq, wk, wv = self.wq, self.wk, self.wv
        plain = all(type(m) is nn.Linear and type(m.weight) in (torch.Tensor, nn.Parameter) for m in (wq, wk, wv))
        if not plain:  # a tensor-subclass weight (torchao's quantized layouts) cannot be concatenated
            return wq(x), wk(x), wv(x)
        weight = torch.cat([wq.weight, wk.weight, wv.weight])  # (Hq*hd + 2*Hkv*hd, D)
        bias = None if wq.bias is None else torch.cat([wq.bias, wk.bias, wv.bias])
        sizes = [wq.out_features, wk.out_features, wv.out_features]
        return F.linear(x, weight, bias).split(sizes, dim=-1)  # (B, T, Hq*hd), (B, T, Hkv*hd) x 2

    def init_weights(self, init_std: float, residual_std: float, generator: torch.Generator | None = None) -> None:
        """Normal(0, init_std) on q/k/v, Normal(0, residual_std) on the output projection, zero biases."""
        for linear, std in (
            (self.wq, init_std),
            (self.wk, init_std),
            (self.wv, init_std),
            (self.wo, residual_std),
        ):
            _init_linear(linear, std, generator)
        self.init_buffers()

    def init_buffers(self) -> None:
        """Recompute the rotary tables (they are not saved; needed after building on the meta device)."""
        if self.rotary:
            cos, sin = rope_cache(self.config)
            device, dtype = self.rope_cos.device, self.rope_cos.dtype
            self.rope_cos = cos.to(device=device, dtype=dtype)
            self.rope_sin = sin.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- MLPs


class MLP(nn.Module):
    """GPT MLP: proj(gelu(fc(x))), 4x wide by default."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.dim, config.ffn_hidden, bias=config.bias)
        self.act = nn.GELU(approximate="tanh" if config.activation == "gelu_tanh" else "none")
        self.proj = nn.Linear(config.ffn_hidden, config.dim, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))  # (B, T, D) -> (B, T, F) -> (B, T, D)

    def init_weights(self, init_std: float, residual_std: float, generator: torch.Generator | None = None) -> None:
        _init_linear(self.fc, init_std, generator)
        _init_linear(self.proj, residual_std, generator)


class SwiGLU(nn.Module):
    """Llama MLP: w2(silu(w1 x) * w3 x) (GLU variants, arXiv 2002.05202); w1 gate, w3 up, w2 down."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_hidden, bias=config.bias)
        self.w3 = nn.Linear(config.dim, config.ffn_hidden, bias=config.bias)
        self.w2 = nn.Linear(config.ffn_hidden, config.dim, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paged = kv.current()  # inference over the paged KV cache: gate and up may be one pre-fused GEMM
        gate, up = (paged is not None and paged.project(self, x)) or (self.w1(x), self.w3(x))  # (B, T, F) each
        hidden = fused_swiglu(gate, up) if kernels.worth_fusing(gate) else F.silu(gate) * up
        return self.dropout(self.w2(hidden))  # (B, T, F) -> (B, T, D)

    def init_weights(self, init_std: float, residual_std: float, generator: torch.Generator | None = None) -> None:
        _init_linear(self.w1, init_std, generator)
        _init_linear(self.w3, init_std, generator)
        _init_linear(self.w2, residual_std, generator)


# ----------------------------------------------------------------------------- block


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(attn_norm(x)), then + mlp(mlp_norm(x)); (B, T, D) -> (B, T, D)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config) if config.family == "gpt" else SwiGLU(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))  # (B, T, D)
        x = x + self.mlp(self.mlp_norm(x))  # (B, T, D)
        return x

    def forward_residual(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on the residual stream ``x + residual`` (``residual`` None: ``x``), returned as two parts
        (h, r), h + r = ``forward(x + residual)`` with the same numbers: each residual add is left to the next
        norm, which fuses it (:func:`add_norm`; vLLM's layers pass (hidden, residual) the same way). For the
        inference forward; training runs :meth:`forward`."""
        residual, h = add_norm(self.attn_norm, x, residual)  # (B, T, D) each
        residual, h = add_norm(self.mlp_norm, self.attn(h), residual)
        return self.mlp(h), residual

    def init_weights(self, init_std: float, residual_std: float, generator: torch.Generator | None = None) -> None:
        """GPT-2 init: norms to identity, linears Normal(0, init_std), residual projections residual_std.

        ``generator``: where the random draws come from (None: the default generator of the weights' device).
        """
        self.attn_norm.reset_parameters()
        self.mlp_norm.reset_parameters()
        self.attn.init_weights(init_std, residual_std, generator)
        self.mlp.init_weights(init_std, residual_std, generator)


def _init_linear(linear: nn.Module, std: float, generator: torch.Generator | None = None) -> None:
    nn.init.normal_(linear.weight, mean=0.0, std=std, generator=generator)
    if getattr(linear, "bias", None) is not None:
        nn.init.zeros_(linear.bias)
