# Sharded, layout-independent, atomic checkpoints with torch.distributed.checkpoint (DCP).
"""A checkpoint is a folder ``step_N/`` holding DCP's files (``.metadata``, ``__R_0.distcp``), one
``rng_rank{R}.pt`` per rank, and ``pipeloom.json`` (the manifest: step, model config, tokenizer, layout,
and the size and sha256 of every file).

Layout independence. Every tensor is stored whole, under its name in the plain un-sharded model
(``blocks.3.attn.wq.weight``; AdamW moments as ``optim.blocks.3.attn.wq.weight.exp_avg``). On save, each
rank all-gathers its tensor-parallel shards over the tp group into full tensors; ranks of other pipeline
stages hold other names, and DCP's planner writes a name held by several ranks (tp peers, dp replicas)
only once. On load, each rank asks DCP for the full tensors of the names it holds now - whatever
(pp, tp, dp) layout wrote them - and keeps its own slice. We chose full tensors over DTensor/ShardedTensor
shards because pipeloom's tensor-parallel layers hold plain tensors (and pad vocabularies to a multiple
of tp): full tensors need no resharding metadata, make any layout read any other, and cost one
all-gather per tensor on save, which is small next to the write. A tied second copy (the output head
sharing the embedding on the last stage) is saved once under its first name and loaded from it.

Atomicity. Everything is written to ``step_N.tmp/``; rank 0 writes the manifest last and renames the
folder to ``step_N`` only after every rank has finished. A crash mid-save leaves a ``.tmp`` folder
that :func:`latest_checkpoint` ignores (and the next save removes), so the last good checkpoint stays
the newest. Loading checks the manifest, the files' sizes and checksums, the model shape and the
tokenizer, and raises :class:`CheckpointError` saying what is wrong instead of loading garbage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

MANIFEST = "pipeloom.json"
FORMAT = "pipeloom-checkpoint-1"
_STEP_DIR = re.compile(r"^step_(\d+)$")
ADAM_STATE = ("exp_avg", "exp_avg_sq")


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupted or does not fit the model being trained."""


@dataclass
class ParamSpec:
    """One local parameter: its full-model name, full shape, and how tensor parallelism slices it."""

    name: str  # canonical name in the un-sharded model (a tied copy carries its first name)
    param: nn.Parameter
    full_shape: tuple[int, ...]
    shard_dim: int | None  # the dimension split over tp ranks; None: replicated on every tp rank
    primary: bool = True  # False for the second copy of a tied parameter (saved by its first holder)
    counted: bool = True  # counted in the global gradient norm here (replicated tensors: tp rank 0 only)


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


# ---------------------------------------------------------------------------------------------------------
# Finding checkpoints.


def checkpoint_steps(directory: str) -> list[tuple[int, str]]:
    """``(step, path)`` of the completed (renamed) checkpoint folders in ``directory``, oldest first."""
    if not directory or not os.path.isdir(directory):
        return []
    found = []
    for entry in os.listdir(directory):
        m = _STEP_DIR.match(entry)
        if m and os.path.isdir(os.path.join(directory, entry)):
            found.append((int(m.group(1)), os.path.join(directory, entry)))
    return sorted(found)


def latest_checkpoint(directory: str) -> str | None:
    """The newest completed checkpoint folder in ``directory`` (``.tmp`` folders are ignored), or None."""
    steps = checkpoint_steps(directory)
    return steps[-1][1] if steps else None


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: str, verify: bool = True) -> dict:
    """The manifest of checkpoint ``path`` after checking that every listed file is intact."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: it is incomplete (an interrupted save) or not "
                              "a pipeloom checkpoint; delete it or point checkpoint.dir elsewhere")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path}: unreadable {MANIFEST} ({err}); the checkpoint is corrupted") \
            from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    for name, info in manifest["files"].items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"checkpoint {path} is corrupted: file {name} is missing")
        size = os.path.getsize(file)
        if size != info["size"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} is {size} bytes, the manifest says "
                                  f"{info['size']}; delete this checkpoint (older ones in the folder still work)")
        if verify and _sha256(file) != info["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: the sha256 of {name} does not match the manifest; "
                                  "delete this checkpoint (older ones in the folder still work)")
    return manifest


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
# Save and load.


def _state_for_save(specs: list[ParamSpec], optimizer, tp_group) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for spec in specs:
        if not spec.primary:
            continue
        state[f"model.{spec.name}"] = gather_full(spec, spec.param, tp_group)
        opt_state = optimizer.state.get(spec.param, {}) if optimizer is not None else {}
        if opt_state:
            state[f"optim.{spec.name}.step"] = opt_state["step"].detach().float().cpu().reshape(())
            for key in ADAM_STATE:
                state[f"optim.{spec.name}.{key}"] = gather_full(spec, opt_state[key], tp_group)
    return state


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_checkpoint(directory: str, step: int, *, specs: list[ParamSpec], optimizer, tp_group=None,
                    meta: dict, keep: int = 2) -> str:
    """Write checkpoint ``directory/step_{step}`` atomically on every rank (collective); returns its path.

    ``meta`` (JSON-able: model config, tokenizer spec, layout, data settings, tokens seen) goes into the
    manifest. Keeps the newest ``keep`` checkpoints.
    """
    import torch.distributed.checkpoint as dcp

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
    from pipeloom.parallel.rng import stream_states

    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
           "sharded": stream_states()}  # tensor-parallel dropout streams (pipeloom.parallel.rng)
    torch.save(rng, os.path.join(tmp, f"rng_rank{_rank()}.pt"))
    _barrier()
    if _rank() == 0:
        files = {}
        for name in sorted(os.listdir(tmp)):
            file = os.path.join(tmp, name)
            _fsync(file)
            files[name] = {"size": os.path.getsize(file), "sha256": _sha256(file)}
        manifest = {"format": FORMAT, "step": step, "files": files, **meta}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):  # saving the same step again: move the old one aside first
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(directory)
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


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str, *, specs: list[ParamSpec], optimizer, tp: int = 1, tp_rank: int = 0,
                    model_config: dict, tokenizer: dict | None = None, verify: bool = True,
                    restore_rng: bool = True) -> dict:
    """Load checkpoint ``path`` into this rank's parameters and AdamW state (collective); returns the manifest.

    Works whatever (pp, tp, dp) layout saved it. RNG states are restored when ``restore_rng`` and the
    checkpoint was saved by the same layout (a different layout has different ranks; the data order does
    not depend on them).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    manifest = read_manifest(path, verify=verify)
    check_compatible(manifest, path, model_config, tokenizer)
    metadata = FileSystemReader(path).read_metadata().state_dict_metadata
    with_optim = optimizer is not None and any(k.startswith("optim.") for k in metadata)
    wanted: dict[str, torch.Tensor] = {}
    for spec in specs:
        keys = [f"model.{spec.name}"]
        if with_optim:
            keys += [f"optim.{spec.name}.{k}" for k in ADAM_STATE]
        for key in keys:
            info = metadata.get(key)
            if not isinstance(info, TensorStorageMetadata):
                raise CheckpointError(f"checkpoint {path} has no tensor {key!r}; it was saved from a different model")
            if tuple(info.size) != spec.full_shape:
                raise CheckpointError(f"checkpoint {path}: {key} has shape {tuple(info.size)}, this model needs "
                                      f"{spec.full_shape}")
            wanted[key] = torch.empty(spec.full_shape, dtype=spec.param.dtype)
        if with_optim:
            wanted[f"optim.{spec.name}.step"] = torch.zeros(())
    try:
        with _quiet_single_process():
            dcp.load(wanted, checkpoint_id=path)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} could not be read ({type(err).__name__}: {err}); it is corrupted "
                              "or incomplete") from err
    fused = bool(optimizer is not None and optimizer.defaults.get("fused"))
    with torch.no_grad():
        for spec in specs:
            spec.param.copy_(local_slice(spec, wanted[f"model.{spec.name}"], tp, tp_rank))
            if with_optim:
                p = spec.param
                step = wanted[f"optim.{spec.name}.step"]
                state = {"step": step.to(p.device) if fused else step.clone()}
                for key in ADAM_STATE:
                    state[key] = local_slice(spec, wanted[f"optim.{spec.name}.{key}"], tp, tp_rank).to(
                        p.device, p.dtype).clone()
                optimizer.state[p] = state
    rng_file = os.path.join(path, f"rng_rank{_rank()}.pt")
    if restore_rng and os.path.exists(rng_file):
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if rng.get("sharded"):
            from pipeloom.parallel.rng import set_stream_states

            set_stream_states(rng["sharded"])
    return manifest
