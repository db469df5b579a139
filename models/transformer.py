# The decoder-only Transformer (GPT-2 or Llama style) as embed -> blocks -> head, splittable into stages.
"""A plain ``nn.Module`` in the nanoGPT / gpt-fast style.

Structure contract (``pipeloom.parallel`` relies on it):

* ``model.embed``: token ids (B, T) long -> hidden (B, T, D); GPT adds learned positions here.
* ``model.blocks``: ``nn.ModuleList`` of :class:`~pipeloom.models.layers.Block`, each (B, T, D) -> (B, T, D).
* ``model.head``: hidden (B, T, D) -> logits (B, T, V), as ``head.norm`` then ``head.out``.
* ``model.pipeline_layers()`` = ``[embed, *blocks, head]``; ``nn.Sequential`` of them equals ``model``.

With ``tie_embeddings``, ``head.out.weight`` is the very Parameter ``embed.tok.weight``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from pipeloom import kernels
from pipeloom.kernels.cross_entropy import cross_entropy as fused_cross_entropy
from torch import nn

from . import kv
from .config import ModelConfig, get_model_config
from .layers import INIT_STD, Block, add_norm, make_norm

IGNORE_INDEX = -100  # targets with this value do not count in the loss


class Embedding(nn.Module):
    """Token embedding (+ learned positions for GPT) and dropout: (B, T) long -> (B, T, D)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.max_seq_len = config.max_seq_len
        self.tok = nn.Embedding(config.vocab_size, config.dim)
        self.pos = nn.Embedding(config.max_seq_len, config.dim) if config.family == "gpt" else None
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.size(-1)  # tokens (B, T)
        paged = kv.current()  # inference: (1, N) ragged new tokens at paged.positions (models/kv.py)
        if paged is None and T > self.max_seq_len:
            raise ValueError(
                f"sequence length {T} exceeds max_seq_len={self.max_seq_len}; "
                "shorten the input or build the model with a larger max_seq_len"
            )
        x = self.tok(tokens)  # (B, T, D)
        if self.pos is not None:
            pos = torch.arange(T, device=tokens.device) if paged is None else paged.positions  # (T,)
            x = x + self.pos(pos)  # (T, D) broadcast over B
        return self.dropout(x)

    def init_weights(self, init_std: float, generator: torch.Generator | None = None) -> None:
        nn.init.normal_(self.tok.weight, mean=0.0, std=init_std, generator=generator)  # the first draw
        if self.pos is not None:
            nn.init.normal_(self.pos.weight, mean=0.0, std=init_std, generator=generator)


class Head(nn.Module):
    """Final norm and output projection: (B, T, D) -> logits (B, T, V)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = make_norm(config)
        self.out = nn.Linear(config.dim, config.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))  # (B, T, D) -> (B, T, V)

    def forward_residual(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """``forward(x + residual)``, the add fused into the norm where it can be (the inference forward's
        residual stream: :meth:`~pipeloom.models.layers.Block.forward_residual`)."""
        return self.out(add_norm(self.norm, x, residual)[1])  # (..., D) -> (..., V)

    def init_weights(self, init_std: float, init_out: bool = True, generator: torch.Generator | None = None) -> None:
        self.norm.reset_parameters()
        if init_out:
            nn.init.normal_(self.out.weight, mean=0.0, std=init_std, generator=generator)


class Transformer(nn.Module):
    """GPT-2 (LayerNorm, learned positions, GELU, tied head) or Llama (RMSNorm, RoPE, SwiGLU, GQA) model.

    Weights are initialised as GPT-2 (Normal(0, 0.02); residual projections ``wo`` and ``proj``/``w2``
    scaled by 1/sqrt(2 L)), deterministic given ``torch.manual_seed``, layer by layer (see :meth:`init_weights`),
    so a pipeline rank can build only its own layers and hold the dense model's numbers.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Module constructors draw their own default init; fork the CPU RNG so that only init_weights
        # consumes the caller's stream: an eager build equals a meta build + to_empty + init_weights.
        with torch.random.fork_rng(devices=[]):
            self.embed = Embedding(config)
            self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
            self.head = Head(config)
        self.tie_weights()
        if not _on_meta(self):
            self.init_weights()

    @classmethod
    def from_name(cls, name: str, **overrides) -> Transformer:
        """Build the registered size ``name`` (see ``get_model_config``), with field overrides."""
        return cls(get_model_config(name, **overrides))

    def tie_weights(self) -> None:
        """Make ``head.out.weight`` the same Parameter as ``embed.tok.weight`` when the config ties them.

        Call again after anything that re-creates parameters (e.g. ``to_empty`` from the meta device). When
        only one of the two is materialised (a pipeline rank holding the embedding or the head, the other
        left on the meta device) they stay apart: that rank's head keeps its own copy (see :meth:`init_weights`).
        """
        if self.config.tie_embeddings and self.embed.tok.weight.is_meta == self.head.out.weight.is_meta:
            self.head.out.weight = self.embed.tok.weight

    def materialize(self, layers: Iterable[int], device: str | torch.device) -> None:
        """Allocate the pipeline layers ``layers`` (indices into :meth:`pipeline_layers`) of a model built on the
        meta device on ``device``, uninitialised; every other layer stays on the meta device (no memory).
        Then :meth:`init_weights` (or load weights) for the same layers."""
        pipeline = self.pipeline_layers()
        for i in sorted(set(layers)):
            pipeline[i].to_empty(device=device)
        self.tie_weights()

    def init_weights(self, layers: Iterable[int] | None = None, seed: int | None = None) -> int:
        """(Re)initialise pipeline layers GPT-2 style (arXiv 2005.14165 / nanoGPT), and the rotary buffers.

        ``layers``: indices into :meth:`pipeline_layers` (0 the embedding, 1..L the blocks, L+1 the head);
        None: every layer not on the meta device. Layer ``i`` draws from its own generator seeded from
        ``(seed, i)``, and ``seed`` (None: one draw from the default CPU generator, which
        ``torch.manual_seed`` controls) is the only thing taken from the caller's stream. So a layer's
        values depend on the seed and its index alone, and a pipeline rank that materialises only its
        stages' layers (:meth:`materialize`) holds exactly the numbers of the dense model built from the same
        seed, and leaves the default generator where the dense build leaves it. A tied head held without the
        embedding gets the embedding's values (the first draw of layer 0's generator). Returns ``seed``.
        Works after ``model.to_empty(device=...)`` on a model built under ``torch.device("meta")``.
        """
        self.tie_weights()
        if seed is None:
            seed = draw_init_seed()
        residual_std = INIT_STD / math.sqrt(2 * self.config.n_layers)
        pipeline = self.pipeline_layers()
        chosen = range(len(pipeline)) if layers is None else sorted(set(layers))
        for i in chosen:
            layer = pipeline[i]
            if _on_meta(layer):
                if layers is None:
                    continue
                raise ValueError(f"pipeline layer {i} is on the meta device; materialize it first")
            generator = _layer_generator(seed, i, layer)
            if i == 0:
                self.embed.init_weights(INIT_STD, generator)
            elif i <= self.config.n_layers:
                layer.init_weights(INIT_STD, residual_std, generator)
            else:
                own_copy = self.config.tie_embeddings and self.head.out.weight is not self.embed.tok.weight
                self.head.init_weights(INIT_STD, init_out=not self.config.tie_embeddings, generator=generator)
                if own_copy:  # the embedding's table, as layer 0 draws it first
                    nn.init.normal_(self.head.out.weight, mean=0.0, std=INIT_STD,
                                    generator=_layer_generator(seed, 0, layer))
        return seed

    def init_buffers(self) -> None:
        """Recompute non-persistent buffers (rotary tables) only, e.g. after loading weights onto meta."""
        for block in self.blocks:
            block.attn.init_buffers()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) long -> logits (B, T, V)."""
        x = self.embed(tokens)  # (B, T, D)
        for block in self.blocks:
            x = block(x)  # (B, T, D)
        return self.head(x)  # (B, T, V)

    def pipeline_layers(self) -> list[nn.Module]:
        """``[embed, *blocks, head]``: each takes one tensor and returns one; split these into stages."""
        return [self.embed, *self.blocks, self.head]

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross entropy; see :func:`cross_entropy_loss`."""
        return cross_entropy_loss(logits, targets)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied weight counts once).

        ``exclude_embeddings=True`` drops the lookup tables that do no matmul: the position table, and the
        token table when it is untied (a tied token table is also the output projection and stays), as
        nanoGPT does for its MFU estimate.
        """
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            if self.embed.pos is not None:
                params.pop(id(self.embed.pos.weight), None)
            if self.head.out.weight is not self.embed.tok.weight:
                params.pop(id(self.embed.tok.weight), None)
        return sum(p.numel() for p in params.values())

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): ``6 N + 12 L D T``.

        ``N`` = ``num_params(exclude_embeddings=True)``: each matmul weight costs 2 FLOPs per token forward
        and 4 backward. ``12 L D T`` is the attention score and value matmuls (QK^T and AV, 2 * 2 * D * T
        per layer forward, times 3 for forward + backward), counted over the full T x T square as in the
        PaLM paper (arXiv 2204.02311 App. B) and nanoGPT's ``estimate_mfu``. MFU = tokens/s * this / peak.
        """
        c = self.config
        T = c.max_seq_len if seq_len is None else seq_len
        return 6.0 * self.num_params(exclude_embeddings=True) + 12.0 * c.n_layers * c.dim * T


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of logits (B, T, V) against targets (B, T) long, skipping ``IGNORE_INDEX`` (-100).

    Computed in float32 (or wider) whatever the logits dtype. Where :func:`pipeloom.kernels.worth_fusing`
    allows, the fused kernel computes it from the logits as they are, without a float32 copy of them.
    """
    if kernels.worth_fusing(logits):
        return fused_cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, loss_dtype=torch.float32)
    logits = logits.reshape(-1, logits.size(-1))  # (B*T, V)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=IGNORE_INDEX)


def _on_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def draw_init_seed() -> int:
    """The one draw :meth:`Transformer.init_weights` takes from the default CPU generator (its layers' seed)."""
    return int(torch.randint(0, 2**62, (), device="cpu"))


def _layer_generator(seed: int, index: int, layer: nn.Module) -> torch.Generator:
    """The generator pipeline layer ``index`` initialises from, on its parameters' device."""
    device = next(layer.parameters()).device
    mixed = (seed + (index + 1) * 0x9E3779B97F4A7C15) % 2**64  # golden-ratio stride: far-apart seeds per layer
    return torch.Generator(device=device).manual_seed(mixed)
