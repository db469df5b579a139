# Typed config of pipeloom-train (one dataclass per component) in Hydra's ConfigStore, and its validation.
"""The schema behind ``configs/train.yaml``. Each component is one dataclass; the launcher hands each
library function only the slice it needs (``prepare_data(**cfg.data)``, ``build_optimizer(**cfg.optimizer)``).

Groups in the ConfigStore: ``model`` (one option per registered model size, plus ``gpt-demo``) and
``logger`` (``none``, ``jsonl``, ``wandb``)::

    pipeloom-train model=llama-tiny parallel.tp=2 schedule.name=zb-h1 train.steps=50 logger=none

Hydra rejects unknown keys and wrong types while composing; :func:`check_config` rejects values that
compose but cannot run (degrees that do not fit the world size, microbatches a schedule cannot take,
a tp that does not divide the heads - of the named model, or of ``model.hf_checkpoint``'s config.json)
with one :class:`ConfigError` naming the key and the value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class ModelSection:
    """Which model: a registered size, with optional field overrides."""

    name: str = "gpt-tiny"  # a name from pipeloom.models.model_config_names()
    dim: Optional[int] = None  # width D; None: the named size's
    n_layers: Optional[int] = None  # transformer blocks; None: the named size's
    n_heads: Optional[int] = None  # query heads; None: the named size's
    n_kv_heads: Optional[int] = None  # key/value heads (Llama GQA); None: the named size's
    ffn_hidden: Optional[int] = None  # MLP width; None: the family default for dim
    vocab_size: Optional[int] = None  # None: the tokenizer's vocabulary size
    max_seq_len: Optional[int] = None  # position table / rotary cache; None: max(named size's, data.seq_len)
    dropout: float = 0.0  # dropout on embeddings, attention and residual branches
    tie_embeddings: Optional[bool] = None  # output head shares the token embedding; None: the family's default
    hf_checkpoint: Optional[str] = None  # a Hugging Face folder to import (config.json + safetensors)
    recompute: str = "none"  # activation recomputation: none | full | selective
    kernels: str = "auto"  # fused Triton kernels: auto (on a CUDA GPU with triton) | triton (required) | torch (off)


@dataclass
class ParallelSection:
    """Degrees of parallelism; their product must equal the number of processes."""

    dp: Optional[int] = None  # data-parallel replicas; None: world_size / (pp * tp)
    pp: int = 1  # pipeline stages (ranks)
    tp: int = 1  # tensor-parallel shards of every layer
    vpp: Optional[int] = None  # model chunks per pipeline rank; None: the schedule's default
    sequence_parallel: bool = False  # shard norms/dropout activations along the sequence (needs tp > 1)
    split: str = "uniform"  # how layers are cut into stages: uniform | parameters
    dp_overlap: bool = False  # launch the dp gradient all-reduce in buckets during backward (synchronous schedules)
    dp_bucket_mb: float = 25.0  # size of one dp all-reduce bucket, MiB


@dataclass
class ScheduleSection:
    """The pipeline schedule (any name registered in pipeloom.schedules)."""

    name: str = "1f1b"  # e.g. gpipe, 1f1b, interleaved-1f1b, zb-h1, zb-h2, zb-v, pipedream, pipedream-2bw
    microbatches: int = 4  # microbatches per step (per data-parallel replica)
    options: dict[str, Any] = field(default_factory=dict)  # schedule options: +schedule.options.vertical_sync=true


@dataclass
class OptimizerSection:
    """AdamW with linear warmup and cosine decay."""

    lr: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 10  # linear warmup from 0 to lr
    decay_steps: Optional[int] = None  # cosine decay length after warmup; None: train.steps - warmup_steps
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled weight decay on matrices (not on norms, biases)
    grad_clip: float = 1.0  # clip the global gradient norm (across pp and tp ranks) to this; 0: off
    fused: Optional[bool] = None  # fused AdamW kernel; None: where available (CUDA)
    zero: int = 0  # ZeRO stage: 0 (off) | 1 (AdamW state sharded over the dp replicas)


@dataclass
class DataSection:
    """Corpus, tokenizer and batch shape."""

    files: Optional[str] = None  # a glob of text files; None: the Python standard library's .py files
    tokenizer: str = "byte"  # byte | bpe (trained here) | hf (tokenizer_path, or the imported checkpoint's)
    tokenizer_path: Optional[str] = None  # a tokenizer.json (for tokenizer=hf)
    bpe_vocab_size: int = 4096  # vocabulary of a BPE trained here
    seq_len: int = 128  # tokens per sequence T
    batch_size: int = 16  # sequences per step over all data-parallel replicas
    val_fraction: float = 0.05  # share of files (by content hash) in the validation split
    max_bytes: Optional[int] = None  # read at most this much of the corpus; None: all
    cache_dir: Optional[str] = None  # where token streams are cached; None: $PIPELOOM_CACHE or ~/.cache/pipeloom


@dataclass
class TrainSection:
    """The loop: length, seed, evaluation and logging cadence."""

    steps: int = 100  # optimizer steps to train (in total, counting steps before a resume)
    seed: int = 0  # seeds the model init and the data order
    log_every: int = 1  # steps between metrics lines
    eval_every: int = 50  # steps between validation losses; 0: only at the end
    eval_batches: int = 4  # validation batches (of data.batch_size sequences) per evaluation
    device: str = "auto"  # auto | cpu | cuda
    mixed_precision: str = "auto"  # auto (bf16 autocast on GPU, none on CPU) | bf16 | none
    compile: bool = False  # torch.compile each transformer block (Inductor; the first steps pay the compile time)
    float8: str = "off"  # float8 linears through torchao: off | tensorwise | rowwise (training/float8.py)
    float8_min_dim: Optional[int] = None  # convert linears with in and out features >= this; None: torchao's table
    float8_head: bool = False  # the output head in float8 too (default: bf16, as torchtitan keeps its output layer)
    float8_fast_accum: bool = False  # fast float8 accumulation in the backward GEMMs too (faster, less exact)
    timeline: bool = True  # at the end, draw the measured timeline of the last step next to the simulated one
    sample_tokens: int = 0  # at the end, print this many tokens sampled from the final checkpoint (any layout)
    stop_after: Optional[int] = None  # stop (as if killed) after this step, without a final save; for tests


@dataclass
class CheckpointSection:
    """Sharded, layout-independent checkpoints (torch.distributed.checkpoint)."""

    dir: Optional[str] = None  # where step_N folders go; None: <run dir>/checkpoints
    every: int = 0  # save every this many steps (and at the end); 0: only at the end
    resume: bool = False  # continue from the newest complete checkpoint in dir (none there: start fresh)
    keep: int = 2  # complete checkpoints kept; older ones are deleted
    verify: bool = True  # check file checksums before loading
    save_final: bool = True  # save when training ends


@dataclass
class LoggerSection:
    """Where metrics go besides the progress bar."""

    kind: str = "jsonl"  # none | jsonl | wandb (wandb also writes the JSONL)
    file: str = "metrics.jsonl"  # the JSONL file, in the run directory
    project: str = "pipeloom"  # wandb project
    mode: str = "offline"  # wandb mode: offline (default, no network) | online | disabled


@dataclass
class TrainConfig:
    """Everything ``pipeloom-train`` needs."""

    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logger: LoggerSection = field(default_factory=LoggerSection)


# A small byte-level GPT that visibly learns in minutes on CPU (the demo's model): about 1.2M parameters.
MODEL_PRESETS = {"gpt-demo": ModelSection(name="gpt-tiny", dim=128, n_layers=6, n_heads=4)}


def register() -> None:
    """Store the schema and the ``model`` and ``logger`` group options in Hydra's ConfigStore."""
    from pipeloom.models import model_config_names

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for name in model_config_names():
        cs.store(group="model", name=name, node=ModelSection(name=name))
    for name, node in MODEL_PRESETS.items():
        cs.store(group="model", name=name, node=node)
    for kind in ("none", "jsonl", "wandb"):
        cs.store(group="logger", name=kind, node=LoggerSection(kind=kind))


class ConfigError(ValueError):
    """A config value that cannot run; the message starts with ``key=value``."""

    def __init__(self, key: str, value: Any, why: str):
        super().__init__(f"{key}={value!r}: {why}")
        self.key, self.value = key, value


def _positive(key: str, value: Any, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ConfigError(key, value, "must be " + ("non-negative" if allow_zero else "positive"))


def check_config(cfg: Any, world_size: int) -> dict[str, Any]:
    """Validate ``cfg`` (a TrainConfig or its DictConfig) for ``world_size`` processes, before any work.

    Returns the resolved values the launcher needs: ``{"dp", "model_config", "vpp"}`` (``model_config`` is
    None with ``model.hf_checkpoint``: the launcher imports the checkpoint's own). Raises
    :class:`ConfigError` naming the first bad key and its value.
    """
    from pipeloom.schedules import ScheduleError, get_schedule

    par, sch, dat, tr, opt, ck, lg, mdl = (cfg.parallel, cfg.schedule, cfg.data, cfg.train, cfg.optimizer,
                                           cfg.checkpoint, cfg.logger, cfg.model)
    for key, value in (("parallel.pp", par.pp), ("parallel.tp", par.tp), ("parallel.dp", par.dp),
                       ("parallel.vpp", par.vpp), ("schedule.microbatches", sch.microbatches),
                       ("train.steps", tr.steps), ("data.seq_len", dat.seq_len), ("data.batch_size", dat.batch_size),
                       ("train.log_every", tr.log_every), ("optimizer.lr", opt.lr), ("checkpoint.keep", ck.keep)):
        _positive(key, value)
    for key, value in (("checkpoint.every", ck.every), ("train.eval_every", tr.eval_every),
                       ("optimizer.warmup_steps", opt.warmup_steps), ("optimizer.grad_clip", opt.grad_clip),
                       ("train.eval_batches", tr.eval_batches)):
        _positive(key, value, allow_zero=True)
    choices = {"logger.kind": (lg.kind, ("none", "jsonl", "wandb")),
               "data.tokenizer": (dat.tokenizer, ("byte", "bpe", "hf")),
               "model.recompute": (mdl.recompute, ("none", "full", "selective")),
               "model.kernels": (mdl.kernels, ("auto", "triton", "torch")),
               "parallel.split": (par.split, ("uniform", "parameters")),
               "train.device": (tr.device, ("auto", "cpu", "cuda")),
               "train.mixed_precision": (tr.mixed_precision, ("auto", "bf16", "none")),
               "train.float8": (tr.float8, ("off", "tensorwise", "rowwise"))}
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise ConfigError(key, value, f"valid choices: {', '.join(valid)}")
    _positive("train.float8_min_dim", tr.float8_min_dim)
    for key in ("float8_head", "float8_fast_accum"):
        if getattr(tr, key) and tr.float8 == "off":
            raise ConfigError(f"train.{key}", getattr(tr, key), "applies to float8 linears: set train.float8="
                              "tensorwise|rowwise too, or leave it false")
    if tr.float8 != "off":
        from pipeloom import features

        if not features.has("torchao"):
            raise ConfigError("train.float8", tr.float8, "needs the optional package 'torchao' (pip install "
                              "'pipeloom[quant]'); or use train.float8=off")
    if lg.kind == "wandb":
        from pipeloom import features

        if not features.has("wandb"):
            raise ConfigError("logger.kind", "wandb", "needs the optional package 'wandb' (pip install "
                              "'pipeloom[wandb]'); or use logger=jsonl")
    if world_size % (par.pp * par.tp):
        raise ConfigError("parallel.pp" if par.pp > 1 else "parallel.tp", par.pp if par.pp > 1 else par.tp,
                          f"pp={par.pp} * tp={par.tp} does not divide the world size {world_size}")
    dp = par.dp if par.dp is not None else world_size // (par.pp * par.tp)
    if dp * par.pp * par.tp != world_size:
        raise ConfigError("parallel.dp", par.dp, f"dp * pp * tp = {dp} * {par.pp} * {par.tp} = "
                          f"{dp * par.pp * par.tp} != world size {world_size} (processes started)")
    if dat.batch_size % (dp * sch.microbatches):
        raise ConfigError("schedule.microbatches", sch.microbatches,
                          f"data.batch_size={dat.batch_size} must be divisible by dp * microbatches = "
                          f"{dp} * {sch.microbatches}")
    options = dict(sch.options or {})
    try:
        plan = get_schedule(sch.name, pp=par.pp, microbatches=sch.microbatches, vpp=par.vpp, **options)
    except ScheduleError as err:
        text = str(err)
        key, value = ("schedule.name", sch.name) if "unknown schedule" in text else (
            ("schedule.options", options) if "option" in text else
            ("parallel.vpp", par.vpp) if "vpp" in text else ("schedule.microbatches", sch.microbatches))
        raise ConfigError(key, value, text) from None
    if opt.zero not in (0, 1):
        raise ConfigError("optimizer.zero", opt.zero, "valid: 0 (off) or 1 (optimizer state sharded over dp); "
                          "ZeRO-2/3 are not implemented")
    _positive("parallel.dp_bucket_mb", par.dp_bucket_mb)
    if plan.is_versioned and (par.dp_overlap or opt.zero):
        key, value = ("parallel.dp_overlap", par.dp_overlap) if par.dp_overlap else ("optimizer.zero", opt.zero)
        raise ConfigError(key, value, f"schedule {sch.name} updates weights inside the step, where each update "
                          "reduces its own gradients; use it with a synchronous schedule (gpipe, 1f1b, zb-*, ...)")
    if plan.is_forward_only:
        raise ConfigError("schedule.name", sch.name, "is forward-only (inference); training needs backward actions")
    if mdl.hf_checkpoint is None:
        model_config = _named_model_config(mdl)
    else:
        model_config = _checkpoint_model_config(mdl)
    for name in ("n_heads", "n_kv_heads", "ffn_hidden"):
        if getattr(model_config, name) % par.tp:
            raise ConfigError("parallel.tp", par.tp, f"does not divide the model's {name}="
                              f"{getattr(model_config, name)}"
                              + (f" (from {mdl.hf_checkpoint}/config.json)" if mdl.hf_checkpoint else ""))
    if dat.seq_len > model_config.max_seq_len:
        raise ConfigError("data.seq_len", dat.seq_len, f"exceeds the model's max_seq_len="
                          f"{model_config.max_seq_len}; raise model.max_seq_len or shorten the sequences")
    stages = plan.num_stages
    if stages > model_config.n_layers + 2:
        raise ConfigError("parallel.pp", par.pp, f"{stages} pipeline stages (pp * vpp) exceed the model's "
                          f"{model_config.n_layers + 2} layers (embedding, {model_config.n_layers} blocks, head)")
    if plan.is_versioned and stages > 1 and model_config.tie_embeddings:
        raise ConfigError("model.tie_embeddings", True, f"schedule {sch.name} keeps weight versions per stage, and "
                          "the head on the last stage would share the embedding's weights with stage 0 at another "
                          "version; set model.tie_embeddings=false (or train a llama model)")
    if mdl.hf_checkpoint is not None:
        model_config = None  # the launcher imports the checkpoint itself
    if par.sequence_parallel and dat.seq_len % par.tp:
        raise ConfigError("data.seq_len", dat.seq_len, f"sequence parallelism needs tp={par.tp} to divide it")
    return {"dp": dp, "model_config": model_config, "vpp": plan.vpp}


_OVERRIDES = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size", "max_seq_len", "tie_embeddings")


def _named_model_config(mdl: Any):
    """The ModelConfig of ``model.name`` with the section's overrides (a ConfigError naming a bad one)."""
    from pipeloom.models import get_model_config

    overrides = {k: getattr(mdl, k) for k in _OVERRIDES if getattr(mdl, k) is not None}
    try:
        return get_model_config(mdl.name, dropout=mdl.dropout, **overrides)
    except KeyError as err:
        raise ConfigError("model.name", mdl.name, str(err).strip("'\"")) from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.{_first_field(str(err))}", getattr(mdl, _first_field(str(err)), None),
                          str(err)) from None


def _checkpoint_model_config(mdl: Any):
    """The ModelConfig a Hugging Face folder's ``config.json`` describes (read without the weights)."""
    import json
    import os

    from pipeloom.models.hf_config import config_from_hf

    path = os.path.join(mdl.hf_checkpoint, "config.json")
    try:
        with open(path) as f:
            hf_config = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError("model.hf_checkpoint", mdl.hf_checkpoint, f"cannot read {path} ({err}); point it at a "
                          "Hugging Face model folder (config.json and safetensors)") from None
    try:
        return config_from_hf(hf_config, dropout=mdl.dropout)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError("model.hf_checkpoint", mdl.hf_checkpoint, f"{path}: {err}") from None


def _first_field(message: str) -> str:
    """The ModelConfig field a validation message starts with (``"dim=12 is not ..."`` -> ``"dim"``)."""
    head = message.split("=")[0].strip().split()[-1] if "=" in message else "name"
    return head if head in {f.name for f in dataclasses.fields(ModelSection)} else "name"
