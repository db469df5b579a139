# pipeloom-train: parse the config, build mesh/data/model/step/optimizer, and run the training loop.
"""Train a transformer with any pipeline schedule and (pp, tp, dp) layout::

    pipeloom-train model=gpt-tiny train.steps=100                        # one process
    torchrun --nproc_per_node=4 -m pipeloom.launch.train parallel.pp=2 parallel.tp=2 schedule.name=1f1b
    pipeloom-train checkpoint.dir=ckpt checkpoint.resume=true hydra.run.dir=runs/a   # continue a run

Fields and groups: ``configs/train.py``. The run directory (``hydra.run.dir``) receives metrics.jsonl,
timeline.png and, unless ``checkpoint.dir`` says otherwise, checkpoints/.
"""

from __future__ import annotations

import functools
import io
import os
import sys

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from pipeloom.configs.train import ConfigError, check_config, register
from pipeloom.launch.report import hydra_error_line, report_once

register()


def run(cfg: DictConfig, run_dir: str | None = None):
    """The whole job on this rank (tests call it with a composed config and their own ``run_dir``)."""
    from pipeloom import features
    from pipeloom.data import TokenBatches, eval_batches, prepare_data
    from pipeloom.kernels import MIN_FUSED_ELEMENTS, set_kernels
    from pipeloom.models import Transformer
    from pipeloom.models.hf import read_hf_config, read_hf_tensors
    from pipeloom.parallel.mesh import Mesh
    from pipeloom.schedules import get_schedule
    from pipeloom.training import (
        MetricsLogger,
        build_optimizer,
        build_parts,
        lr_at,
        make_stepper,
        peak_flops,
        train,
    )
    from pipeloom.training.env import (
        autocast_for,
        barrier,
        broadcast_object,
        init_distributed,
        resolve_device,
        world_from_env,
    )

    rank, world, _ = world_from_env()
    resolved = check_config(cfg, world)  # one ConfigError naming key and value, before any work
    device = resolve_device(cfg.train.device)
    kernel_mode = cfg.model.kernels if device.type == "cuda" or cfg.model.kernels != "auto" else "torch"
    try:  # the models ask pipeloom.kernels which path to run; "auto": Triton on a CUDA GPU with triton
        set_kernels(kernel_mode)
    except RuntimeError as err:
        raise ConfigError("model.kernels", cfg.model.kernels, str(err)) from None
    kernel_path = (f"Triton for tensors of >= {MIN_FUSED_ELEMENTS:,} elements, torch below"
                   if kernel_mode != "torch" and features.triton_usable() else "torch")
    if cfg.train.float8 != "off":
        from pipeloom.training.float8 import check_float8_device

        why = check_float8_device(device)
        if why:
            raise ConfigError("train.float8", cfg.train.float8, why)
    distributed = init_distributed(device)
    par, dp = cfg.parallel, resolved["dp"]
    mesh = Mesh.build(dp=dp, pp=par.pp, tp=par.tp, device_type=device.type) if distributed else None
    run_dir = broadcast_object(run_dir or _run_dir())

    data_cfg = OmegaConf.to_container(cfg.data)
    batch_size, seq_len = data_cfg.pop("batch_size"), data_cfg.pop("seq_len")
    init_state, model_config = None, resolved["model_config"]
    if cfg.model.hf_checkpoint:  # each rank reads only its own stages' tensors (build_parts asks for them)
        model_config = read_hf_config(cfg.model.hf_checkpoint, dropout=cfg.model.dropout)
        init_state = functools.partial(read_hf_tensors, cfg.model.hf_checkpoint, model_config)
        if data_cfg["tokenizer"] == "hf" and not data_cfg["tokenizer_path"]:
            data_cfg["tokenizer_path"] = os.path.join(cfg.model.hf_checkpoint, "tokenizer.json")
    if rank == 0:  # rank 0 tokenizes (once, cached); the others open its files
        data = prepare_data(**data_cfg)
    barrier()
    if rank != 0:
        data = prepare_data(**data_cfg)
    if cfg.model.vocab_size is None and init_state is None:
        model_config = model_config.replace(vocab_size=data.tokenizer.vocab_size)
    if data.tokenizer.vocab_size > model_config.vocab_size:
        raise ConfigError("model.vocab_size", model_config.vocab_size,
                          f"smaller than the tokenizer's vocabulary ({data.tokenizer.vocab_size})")

    plan = get_schedule(cfg.schedule.name, pp=par.pp, microbatches=cfg.schedule.microbatches, vpp=par.vpp,
                        **(cfg.schedule.options or {}))
    parts = build_parts(model_config, plan, mesh=mesh, seed=cfg.train.seed, device=device,
                        sequence_parallel=par.sequence_parallel, recompute=cfg.model.recompute, split=par.split,
                        init_state=init_state, compile=cfg.train.compile, float8=cfg.train.float8,
                        float8_min_dim=cfg.train.float8_min_dim, float8_head=cfg.train.float8_head,
                        float8_fast_accum=cfg.train.float8_fast_accum)
    autocast = autocast_for(device, cfg.train.mixed_precision)
    opt = cfg.optimizer
    zero_group = mesh.dp_group if opt.zero and mesh is not None and dp > 1 else None
    optimizer = build_optimizer(parts.named_parameters(), **{k: v for k, v in opt.items() if k != "zero"},
                                zero_group=zero_group)
    stepper = make_stepper(parts, mesh, autocast, optimizer=optimizer, grad_clip=opt.grad_clip,
                           sequence_parallel=par.sequence_parallel, dp_overlap=par.dp_overlap,
                           bucket_mb=par.dp_bucket_mb)
    lr_schedule = functools.partial(lr_at, lr=opt.lr, min_lr=opt.min_lr, warmup_steps=opt.warmup_steps,
                                    decay_steps=opt.decay_steps or max(cfg.train.steps - opt.warmup_steps, 1))
    batches = TokenBatches(data.train, seq_len, batch_size, seed=cfg.train.seed)
    val = eval_batches(data.val, seq_len, batch_size, cfg.train.eval_batches or 1)
    meta = {"model_config": model_config.to_dict(), "tokenizer": data.tokenizer.spec, "seed": cfg.train.seed,
            "layout": {"dp": dp, "pp": par.pp, "tp": par.tp, "vpp": plan.vpp, "schedule": plan.name},
            "data": {"seq_len": seq_len, "batch_size": batch_size, "data_seed": cfg.train.seed}}
    with torch.device("meta"):
        dense = Transformer(model_config)
    flops = dense.flops_per_token(seq_len)
    peak = peak_flops(device)
    logger = MetricsLogger(run_dir, **cfg.logger, config=OmegaConf.to_container(cfg)) if rank == 0 else None
    if rank == 0:
        print(f"{data.describe()}\nmodel: {model_config.family} {dense.num_params():,}"
              f" parameters (this rank: {sum(s.param.numel() for s in parts.specs):,}); layout dp={dp} pp={par.pp} "
              f"tp={par.tp}, schedule {plan.name} (vpp={plan.vpp}, {plan.microbatches} microbatches); "
              f"kernels: {kernel_path}; torch.compile: {'each block' if cfg.train.compile else 'off'}; "
              f"dp all-reduce: {'overlapped with backward' if par.dp_overlap and dp > 1 else 'after backward'}"
              f"{', ZeRO-1 optimizer' if zero_group is not None else ''}; "
              f"run dir {run_dir}")
        if parts.float8 is not None:
            print(parts.float8.summary() + (" (rank 0's stages)" if par.pp > 1 else ""))
    try:
        result = train(parts=parts, stepper=stepper, optimizer=optimizer, batches=batches, val_batches=val, mesh=mesh,
                       lr_schedule=lr_schedule, grad_clip=opt.grad_clip, logger=logger, run_dir=run_dir,
                       checkpoint=OmegaConf.to_container(cfg.checkpoint), checkpoint_meta=meta, device=device,
                       flops_per_token=flops, peak_flops=peak and peak * world,
                       sequence_parallel=par.sequence_parallel,
                       **{k: v for k, v in cfg.train.items() if k not in _BUILD_KEYS})
    finally:
        if logger is not None:
            logger.close()
    if rank == 0:
        first, last = result.losses.get(result.start_step + 1), result.losses.get(result.end_step)
        print(f"steps {result.start_step}->{result.end_step}: loss {first and round(first, 4)} -> "
              f"{last and round(last, 4)}; val_loss {result.val_losses}; {result.tokens_per_s:,.0f} tokens/s; "
              f"bubble rate measured {result.bubble_rate_measured} predicted {result.bubble_rate_predicted}")
        for name, value in (("checkpoint", result.checkpoint), ("timeline", result.timeline_picture)):
            if value:
                print(f"{name}: {value}")
        if cfg.train.sample_tokens and result.checkpoint:
            from pipeloom.training import generate, load_dense

            print(generate(load_dense(result.checkpoint)[0], data.tokenizer, "def ", cfg.train.sample_tokens))
    return result


# train.* read by the build, not by the loop
_BUILD_KEYS = ("device", "compile", "float8", "float8_min_dim", "float8_head", "float8_fast_accum")


def _run_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else os.path.abspath("runs/train")


@hydra.main(config_path="pkg://pipeloom.configs", config_name="train", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    from pipeloom.training.checkpoint import CheckpointError

    _release_stderr()
    try:
        run(cfg)
    except (ConfigError, CheckpointError) as err:
        report_once(f"pipeloom-train: error: {err}")  # one line per job, whichever rank exits first
        sys.exit(2)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _release_stderr() -> None:
    """Hydra has composed the config: give stderr back (rank 0 replays what composition wrote there)."""
    held = sys.stderr
    if isinstance(held, io.StringIO):
        sys.stderr = sys.__stderr__
        if int(os.environ.get("RANK", "0")) == 0:
            sys.stderr.write(held.getvalue())


def main() -> None:
    """Entry point of ``pipeloom-train`` and ``python -m pipeloom.launch.train``."""
    if int(os.environ.get("RANK", "0")) != 0:  # only rank 0 writes Hydra's run dir
        for key, value in (("hydra.output_subdir", "null"), ("hydra.run.dir", ".")):
            if not any(a.startswith(key + "=") for a in sys.argv):
                sys.argv.append(f"{key}={value}")
    # Hydra writes a refused command line (unknown key, wrong type, missing option) to stderr on every rank
    # and exits 1: hold stderr while it composes, and report the refusal once, as one line (report.py).
    sys.stderr = io.StringIO()
    try:
        _app()
    except SystemExit as stop:
        held = sys.stderr
        if isinstance(held, io.StringIO) and stop.code not in (0, None):
            sys.stderr = sys.__stderr__
            report_once("pipeloom-train: error: " + hydra_error_line(held.getvalue(), sys.argv[1:]))
            raise SystemExit(2) from None
        raise
    finally:
        _release_stderr()


if __name__ == "__main__":
    main()
