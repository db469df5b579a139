# Sharded, layout-independent, atomic checkpoints with torch.distributed.checkpoint (DCP).
"""A checkpoint is a folder ``step_N/`` holding DCP's files (``.metadata``, ``__R_0.distcp``), one
``rng_rank{R}.pt`` per rank, and ``pipeloom.json`` (the manifest: step, model config, tokenizer, layout,
optimizer class, and the size and sha256 of every file).

Layout independence. Every tensor is stored whole, under its name in the plain un-sharded model
(``blocks.3.attn.wq.weight``). On save, each rank all-gathers its tensor-parallel shards over the tp group
into full tensors; ranks of other pipeline stages hold other names, and DCP's planner writes a name held
by several ranks (tp peers, dp replicas) only once. On load, each rank asks DCP for the full tensors of
the names it holds now - whatever (pp, tp, dp) layout wrote them - and keeps its own slice. We chose full
tensors over DTensor/ShardedTensor shards because pipeloom's tensor-parallel layers hold plain tensors
(and pad vocabularies to a multiple of tp): full tensors need no resharding metadata, make any layout read
any other, and cost one all-gather per tensor on save, which is small next to the write. A tied second
copy (the output head sharing the embedding on the last stage) is saved once under its first name and
loaded from it.

Optimizer state, whatever the optimizer: DCP's ``get_optimizer_state_dict`` / ``set_optimizer_state_dict``
(``torch.distributed.checkpoint.state_dict``) map it to and from parameter names, and every entry is
stored as ``optim.<parameter name>.<key>`` (AdamW's ``exp_avg``, ``exp_avg_sq``, ``step``; SGD's
``momentum_buffer``; ...): a tensor shaped like its parameter whole, like the parameter, anything else as
it is. The hyperparameters (``param_groups``) come from the run's config, not the checkpoint.

Atomicity (:mod:`pipeloom.training.checkpoint_files`). Everything is written to ``step_N.tmp/``; each rank
hashes its own files, rank 0 writes the manifest last and renames the folder into place after every rank
has finished, never leaving a moment without a complete copy of the step. A crash mid-save leaves a
``.tmp`` folder that :func:`latest_checkpoint` ignores (and the next save removes). Loading checks the
manifest, the files' sizes, the checksums of the files this rank reads, the model shape, the optimizer
class and the tokenizer, and raises :class:`CheckpointError` saying what is wrong instead of loading
garbage. RNG states (the default generator's, and the tensor-parallel dropout streams by name) are
restored when the layout is the one that saved them; a stream that does not match is an error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint_files import (
    FORMAT,
    MANIFEST,
    CheckpointError,
    checkpoint_steps,
    describe_own_files,
    gather_file_lists,
    latest_checkpoint,
    read_manifest,
    replace_folder,
    verify_files,
    write_manifest,
)

__all__ = ["CheckpointError", "ParamSpec", "checkpoint_steps", "gather_full", "latest_checkpoint", "load_checkpoint",
           "local_slice", "read_manifest", "save_checkpoint", "MANIFEST", "FORMAT"]


@dataclass
class ParamSpec:
    """One local parameter: its full-model name, full shape, and how tensor parallelism slices it."""

    name: str  # canonical name in the un-sharded model (a tied copy carries its first name)
    param: nn.Parameter
    full_shape: tuple[int, ...]
    shard_dim: int | None  # the dimension split over tp ranks; None: replicated on every tp rank
    primary: bool = True  # False for the second copy of a tied parameter (saved by its first holder)
    counted: bool = True  # counted in the global gradient norm here (replicated tensors: tp rank 0 only)
    local_name: str = ""  # its own name in the plain model (a tied copy's differs from name); "": name

    def __post_init__(self) -> None:
        self.local_name = self.local_name or self.name


# ---------------------------------------------------------------------------------------------------------
# From local shards to full tensors and back.


def _local_pad(full: int, tp: int) -> int:
    return tp * -(-full // tp)


def gather_full(spec: ParamSpec, tensor: torch.Tensor, tp_group) -> torch.Tensor:
    """The full tensor of ``spec`` from this rank's shard ``tensor`` (all-gather over ``tp_group``)."""
    if spec.shard_dim is None or tp_group is None or dist.get_world_size(tp_group) == 1:
        return tensor.detach().clone() if spec.shard_dim is None else tensor.detach().narrow(
            spec.shard_dim, 0, spec.full_shape[spec.shard_dim]).clone()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, tensor.detach().contiguous(), group=tp_group)
    return torch.cat(parts, dim=spec.shard_dim).narrow(spec.shard_dim, 0, spec.full_shape[spec.shard_dim])


def local_slice(spec: ParamSpec, full: torch.Tensor, tp: int, tp_rank: int) -> torch.Tensor:
    """This tp rank's slice of ``full`` (zero-padded to a multiple of tp along the shard dim)."""
    if spec.shard_dim is None:
        return full
    d = spec.shard_dim
    padded = _local_pad(full.shape[d], tp)
    if padded > full.shape[d]:
        pad_shape = list(full.shape)
        pad_shape[d] = padded - full.shape[d]
        full = torch.cat([full, full.new_zeros(pad_shape)], dim=d)
    return full.chunk(tp, dim=d)[tp_rank]


SHAPE_FIELDS = ("family", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len",
                "tie_embeddings", "bias", "activation")


def check_compatible(manifest: dict, path: str, model_config: dict, tokenizer: dict | None) -> None:
    """Refuse a checkpoint whose model shape or tokenizer differs from this run's (naming the fields)."""
    saved = manifest["model_config"]
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {model_config.get(k)!r}"
             for k in SHAPE_FIELDS if saved.get(k) != model_config.get(k)]
    if diffs:
        raise CheckpointError(f"checkpoint {path} does not fit this model ({'; '.join(diffs)}); resume with the "
                              "model it was trained with, or use another checkpoint.dir")
    if tokenizer is not None and manifest.get("tokenizer") not in (None, tokenizer):
        raise CheckpointError(f"checkpoint {path} was trained with tokenizer {manifest['tokenizer']}, this run uses "
                              f"{tokenizer}; token ids would mean different things")


# ---------------------------------------------------------------------------------------------------------
# Optimizer state through DCP's helpers, keyed by full-model parameter names.


def _param_tree(specs: list[ParamSpec]) -> nn.Module:
    """A module whose ``named_parameters()`` are this rank's parameters under their plain-model names (what
    DCP's optimizer helpers key the state by)."""
    root = nn.Module()
    for spec in specs:
        *path, leaf = spec.local_name.split(".")
        node = root
        for part in path:
            node = node._modules.setdefault(part, nn.Module())
        node.register_parameter(leaf, spec.param)
    return root


def _optimizer_state(specs: list[ParamSpec], optimizer) -> dict[str, dict]:
    """``{local_name: {key: value}}`` of ``optimizer`` (``get_optimizer_state_dict``)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(_param_tree(specs), optimizer)["state"]


def _is_per_element(spec: ParamSpec, value) -> bool:
    """An optimizer state entry shaped like its (local) parameter: stored whole, sliced over tp like it."""
    return torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) == tuple(spec.param.shape)


def _state_for_save(specs: list[ParamSpec], optimizer, tp_group) -> dict:
    state: dict = {}
    optim = _optimizer_state(specs, optimizer) if optimizer is not None else {}
    for spec in specs:
        if not spec.primary:
            continue
        state[f"model.{spec.name}"] = gather_full(spec, spec.param, tp_group)
        for key, value in optim.get(spec.local_name, {}).items():
            if _is_per_element(spec, value):
                value = gather_full(spec, value, tp_group)
            elif torch.is_tensor(value):
                value = value.detach().cpu().clone()  # a step count or another small tensor, whole
            state[f"optim.{spec.name}.{key}"] = value
    return state


def _optimizer_keys(keys) -> dict[str, list[str]]:
    """``{parameter name: [its state keys]}`` of the ``optim.<name>.<key>`` entries among ``keys``."""
    out: dict[str, list[str]] = {}
    for k in keys:
        if k.startswith("optim."):
            name, key = k[len("optim."):].rsplit(".", 1)
            out.setdefault(name, []).append(key)
    return out


def _load_optimizer(specs: list[ParamSpec], optimizer, loaded: dict, tp: int, tp_rank: int) -> None:
    """Put the loaded ``optim.*`` entries into ``optimizer`` (``set_optimizer_state_dict``)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    tree = _param_tree(specs)
    keys = _optimizer_keys(loaded)
    state: dict[str, dict] = {}
    for spec in specs:
        entries = state.setdefault(spec.local_name, {})
        for key in keys.get(spec.name, ()):
            value = loaded[f"optim.{spec.name}.{key}"]
            if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) == spec.full_shape:
                value = local_slice(spec, value, tp, tp_rank).to(spec.param.device).clone()
            entries[key] = value
    groups = get_optimizer_state_dict(tree, optimizer)["param_groups"]  # this run's hyperparameters
    set_optimizer_state_dict(tree, optimizer, {"state": state, "param_groups": groups})


# ---------------------------------------------------------------------------------------------------------
# Save and load.


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_checkpoint(directory: str, step: int, *, specs: list[ParamSpec], optimizer, tp_group=None,
                    meta: dict, keep: int = 2, rng_streams: dict | None = None) -> str:
    """Write checkpoint ``directory/step_{step}`` atomically on every rank (collective); returns its path.

    ``meta`` (JSON-able: model config, tokenizer spec, layout, data settings, tokens seen) goes into the
    manifest. ``rng_streams``: this rank's tensor-parallel dropout streams by name
    (``ModelParts.rng_streams()``), saved with the default generator's state. Keeps the newest ``keep``
    checkpoints.
    """
    import torch.distributed.checkpoint as dcp
    from pipeloom.parallel.rng import stream_states

    final = os.path.join(directory, f"step_{step}")
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(directory, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    state = _state_for_save(specs, optimizer, tp_group)
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=tmp)
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
           "sharded": stream_states(rng_streams or {})}
    torch.save(rng, os.path.join(tmp, f"rng_rank{_rank()}.pt"))
    _barrier()  # every rank's files are complete: each hashes its own, at the same time
    files = gather_file_lists(describe_own_files(tmp))
    if _rank() == 0:
        optimizer_class = type(optimizer).__name__ if optimizer is not None else None
        write_manifest(tmp, {"format": FORMAT, "step": step, "files": files, "optimizer": optimizer_class, **meta})
        replace_folder(tmp, final)
        for _, old in checkpoint_steps(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when there is no process group; that is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _wanted(path: str, metadata: dict, specs: list[ParamSpec], with_optim: bool) -> dict:
    """The entries this rank loads: its parameters' full tensors and, ``with_optim``, their optimizer state."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    wanted: dict = {}
    optimizer_keys = _optimizer_keys(metadata) if with_optim else {}
    for spec in specs:
        key = f"model.{spec.name}"
        info = metadata.get(key)
        if not isinstance(info, TensorStorageMetadata):
            raise CheckpointError(f"checkpoint {path} has no tensor {key!r}; it was saved from a different model")
        if tuple(info.size) != spec.full_shape:
            raise CheckpointError(f"checkpoint {path}: {key} has shape {tuple(info.size)}, this model needs "
                                  f"{spec.full_shape}")
        wanted[key] = torch.empty(spec.full_shape, dtype=spec.param.dtype)
        if not with_optim:
            continue
        for key in optimizer_keys.get(spec.name, ()):  # none: the parameter had no state (never stepped)
            info = metadata[f"optim.{spec.name}.{key}"]
            wanted[f"optim.{spec.name}.{key}"] = (torch.empty(tuple(info.size), dtype=info.properties.dtype)
                                                  if isinstance(info, TensorStorageMetadata) else None)
    return wanted


def load_checkpoint(path: str, *, specs: list[ParamSpec], optimizer, tp: int = 1, tp_rank: int = 0,
                    model_config: dict, tokenizer: dict | None = None, verify: bool = True,
                    restore_rng: bool = True, layout: dict | None = None, rng_streams: dict | None = None) -> dict:
    """Load checkpoint ``path`` into this rank's parameters and optimizer state (collective); returns the manifest.

    Works whatever (pp, tp, dp) layout saved it. RNG states are restored when ``restore_rng`` and the
    checkpoint was saved under ``layout`` (None: do not compare); a different layout has different ranks,
    and the data order does not depend on them. ``rng_streams`` (``ModelParts.rng_streams()``): the dropout
    streams to restore by name; one that does not match the saved ones raises :class:`CheckpointError`
    naming it. None leaves the streams alone.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    manifest = read_manifest(path, verify=False)  # all files there, with their sizes
    check_compatible(manifest, path, model_config, tokenizer)
    if verify:
        verify_files(path, manifest, [".metadata"])
    metadata = FileSystemReader(path).read_metadata()
    with_optim = optimizer is not None and any(k.startswith("optim.") for k in metadata.state_dict_metadata)
    if with_optim and manifest.get("optimizer") not in (None, type(optimizer).__name__):
        raise CheckpointError(f"checkpoint {path} holds {manifest['optimizer']} state; this run's optimizer is "
                              f"{type(optimizer).__name__}")
    wanted = _wanted(path, metadata.state_dict_metadata, specs, with_optim)
    rng_file = f"rng_rank{_rank()}.pt"
    restore_rng = restore_rng and (layout is None or manifest.get("layout") == layout)
    if verify:  # the files this rank reads, and only those
        reads = {info.relative_path for index, info in metadata.storage_data.items() if index.fqn in wanted}
        reads |= {rng_file} if restore_rng and rng_file in manifest["files"] else set()
        _on_every_rank(lambda: verify_files(path, manifest, reads))
    try:
        with _quiet_single_process():
            dcp.load(wanted, checkpoint_id=path)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} could not be read ({type(err).__name__}: {err}); it is corrupted "
                              "or incomplete") from err
    with torch.no_grad():
        for spec in specs:
            spec.param.copy_(local_slice(spec, wanted[f"model.{spec.name}"], tp, tp_rank))
    if with_optim:
        _load_optimizer(specs, optimizer, wanted, tp, tp_rank)
    if restore_rng and os.path.exists(os.path.join(path, rng_file)):
        _restore_rng(path, rng_file, rng_streams)
    return manifest


def _on_every_rank(check) -> None:
    """Run ``check``; when it raised :class:`CheckpointError` on any rank, raise it on every rank (a rank
    that went on into DCP's collective load would wait for the one that stopped)."""
    error = None
    try:
        check()
    except CheckpointError as err:
        error = str(err)
    errors = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    for rank, message in enumerate(errors):
        if message is not None:
            raise CheckpointError(f"rank {rank}: {message}")


def _restore_rng(path: str, rng_file: str, streams: dict | None) -> None:
    from pipeloom.parallel.rng import StreamMismatch, set_stream_states

    rng = torch.load(os.path.join(path, rng_file), weights_only=True)
    if streams is not None:
        try:
            set_stream_states(streams, rng.get("sharded") or {}, where=f"checkpoint's {rng_file}")
        except StreamMismatch as err:
            raise CheckpointError(f"checkpoint {path}: {err}; resume with the model, seed and layout that saved it") \
                from None
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
