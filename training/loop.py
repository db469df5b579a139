# The training loop: steps, dp reduction, global-norm clipping, AdamW, evaluation, metrics, checkpoints.
"""``train(...)`` runs the same loop for every layout. One step::

    loss, _ = stepper.step(inputs, targets)      # LocalStep (pp=1) or PipelineStep (the pipeline runtime)
    sum gradients over dp (each replica holds its share of the global-batch mean: training/steps.py);
    sync sequence-parallel norms over tp
    clip the global gradient norm (squares summed over tp and pp, replicas and tied copies counted once)
    optimizer.step()                              # lr from warmup + cosine, set before the step

A weight-versioned plan (PipeDream, 2BW) steps the optimizer inside ``stepper.step`` at every UPDATE
(:class:`~pipeloom.training.steps.StageUpdate` reduces and clips first); the loop then only sets the lr.

Every ``log_every`` steps rank 0 writes a metrics record (step, loss, lr, tokens_per_s, grad_norm,
bubble_rate_measured, bubble_rate_predicted, mfu) and updates its progress bar. The predicted bubble
rate is the simulator's, fed with the per-stage F/B/W durations measured in the same step, so the two
differ by what the simulator does not model (communication, stragglers, the host).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from pipeloom.schedules import Costs, simulate
from pipeloom.schedules.timeline import Timeline

from .checkpoint import checkpoint_steps, latest_checkpoint, load_checkpoint, save_checkpoint
from .optim import clip_grad_norm, set_lr


@dataclass
class TrainResult:
    """What a run did: per-step losses, validation losses, the last checkpoint and the pictures."""

    start_step: int
    end_step: int
    losses: dict[int, float] = field(default_factory=dict)
    val_losses: dict[int, float] = field(default_factory=dict)
    tokens_per_s: float = 0.0
    bubble_rate_measured: float | None = None
    bubble_rate_predicted: float | None = None
    checkpoint: str | None = None
    timeline_picture: str | None = None
    resumed_from: str | None = None


def bubble_rates(plan, timeline: Timeline):
    """(measured r, predicted r, simulation) for one step's measured timeline of ``plan``: the simulator is
    fed the measured per-chunk F/B/W costs and the measured transfer latency, as
    :meth:`~pipeloom.parallel.runtime.PipelineRuntime.report` does."""
    from pipeloom.parallel.measure import estimate_comm

    costs = timeline.stage_costs(plan)
    sim = simulate(plan, Costs(F=list(costs["F"]), B=list(costs["B"]), W=list(costs["W"]),
                               comm=estimate_comm(timeline)))
    return timeline.bubble_rate(), sim.bubble_rate, sim


def _all_mean(value: float, group, device="cpu") -> float:
    return _all_sum(value, group, device) / (1 if group is None else dist.get_world_size(group))


def _all_sum(value: float, group, device="cpu") -> float:
    if group is None or dist.get_world_size(group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return float(t)


def train(*, parts, stepper, optimizer, batches, val_batches: list, mesh, lr_schedule: Callable[[int], float],
          grad_clip: float, logger, run_dir: str, checkpoint: dict, checkpoint_meta: dict, steps: int,
          log_every: int = 1, eval_every: int = 0, timeline: bool = True, stop_after: int | None = None,
          flops_per_token: float | None = None, peak_flops: float | None = None, device="cpu",
          sequence_parallel: bool = False, progress: bool = True, **_unused) -> TrainResult:
    """Train ``parts`` to ``steps`` optimizer steps, resuming from ``checkpoint["dir"]`` when asked.

    ``checkpoint``: the checkpoint config slice (dir, every, resume, keep, verify, save_final).
    ``batches``: a :class:`~pipeloom.data.TokenBatches`; ``val_batches``: fixed (B, T+1) validation batches.
    ``stop_after``: leave after that step without the final save (what a kill looks like, for tests).
    Collective: every rank calls it. Returns a :class:`TrainResult` (losses on every rank).
    """
    from tqdm import tqdm

    rank = dist.get_rank() if dist.is_initialized() else 0
    dp, dp_rank = (mesh.dp, mesh.dp_rank) if mesh is not None else (1, 0)
    dp_group = mesh.dp_group if mesh is not None and mesh.dp > 1 else None
    tp_group = mesh.tp_group if mesh is not None and mesh.tp > 1 else None
    pp_group = mesh.pp_group if mesh is not None and mesh.pp > 1 else None
    tp, tp_rank = (mesh.tp, mesh.tp_rank) if mesh is not None else (1, 0)
    params = [p for _, p in parts.named_parameters()]
    norm_params = [(s.param, s.counted) for s in parts.specs]
    ckpt_dir = checkpoint["dir"] or os.path.join(run_dir, "checkpoints")
    layout = checkpoint_meta.get("layout")
    result = TrainResult(start_step=0, end_step=0)

    start = 0
    path = latest_checkpoint(ckpt_dir) if checkpoint["resume"] else None
    if path is not None:
        manifest = load_checkpoint(path, specs=parts.specs, optimizer=optimizer, tp=tp, tp_rank=tp_rank,
                                   model_config=checkpoint_meta["model_config"],
                                   tokenizer=checkpoint_meta.get("tokenizer"), verify=checkpoint["verify"],
                                   restore_rng=True, layout=layout, rng_streams=parts.rng_streams())
        if manifest.get("layout") != layout:  # other ranks: RNG states only match under the same layout
            torch.manual_seed(checkpoint_meta.get("seed", 0) + 1000 * manifest["step"] + rank)
        for key in ("seq_len", "batch_size", "data_seed"):
            if manifest.get("data", {}).get(key) != checkpoint_meta.get("data", {}).get(key) and rank == 0:
                print(f"warning: resuming with {key}={checkpoint_meta['data'].get(key)} but the checkpoint used "
                      f"{manifest['data'].get(key)}: the run continues, but not as the uninterrupted one would")
        start = int(manifest["step"])
        result.resumed_from = path
        if rank == 0 and logger is not None:
            logger.rewind(start)
        if rank == 0:
            print(f"resumed from {path} (step {start}, saved under layout {manifest.get('layout')})")
    elif checkpoint["resume"] and rank == 0:
        print(f"checkpoint.resume: no checkpoint in {ckpt_dir}; starting from step 0")
    result.start_step = result.end_step = start

    def save(step: int) -> str:
        meta = {**checkpoint_meta, "tokens_seen": step * batches.batch_size * batches.seq_len}
        return save_checkpoint(ckpt_dir, step, specs=parts.specs, optimizer=optimizer, tp_group=tp_group,
                               meta=meta, keep=checkpoint["keep"], rng_streams=parts.rng_streams())

    def evaluate() -> float:
        parts.train(False)
        losses = []
        for batch in val_batches:
            rows = batch.tensor_split(dp)[dp_rank].to(device)  # this replica's rows (b, T+1)
            losses.append(stepper.evaluate(rows[:, :-1], rows[:, 1:]))
        parts.train(True)
        return _all_mean(sum(losses) / len(losses), dp_group, device)

    bar = tqdm(total=steps, initial=start, disable=not progress or rank != 0, dynamic_ncols=True, desc="train")
    tokens_per_step = batches.batch_size * batches.seq_len
    last_time, last_step = time.perf_counter(), start
    parts.train(True)
    step = start
    measured = predicted = sim = step_timeline = None
    while step < steps:
        lr = lr_schedule(step)
        set_lr(optimizer, lr)
        inputs, targets = batches.microbatches(step, dp_rank, dp, 1)[0]  # (B/dp, T) each
        loss, step_timeline = stepper.step(inputs.to(device), targets.to(device))
        if stepper.updates_weights:  # the optimizer ran at every UPDATE of the step
            norm = stepper.grad_norm
        else:
            if dp_group is not None:
                from pipeloom.parallel.data_parallel import allreduce_gradients

                allreduce_gradients(params, dp_group, op="sum")  # shares of the global-batch mean
            if sequence_parallel and tp_group is not None:
                from pipeloom.parallel.tensor_parallel import sync_sequence_parallel_grads

                for module in parts.modules.values():
                    sync_sequence_parallel_grads(module, tp_group)
            norm = clip_grad_norm(norm_params, grad_clip, groups=(tp_group, pp_group))
            optimizer.step()
        loss = _all_sum(loss, dp_group, device)  # the global-batch mean
        step += 1
        result.losses[step] = loss
        result.end_step = step
        if step % log_every == 0 or step == steps:
            full = stepper.timeline()  # collective over pp
            measured, predicted, sim = bubble_rates(parts.plan, full)
            now = time.perf_counter()
            tps = (step - last_step) * tokens_per_step / max(now - last_time, 1e-9)
            last_time, last_step = now, step
            mfu = tps * flops_per_token / peak_flops if (peak_flops and flops_per_token) else None
            record = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tps, "grad_norm": norm,
                      "bubble_rate_measured": measured, "bubble_rate_predicted": predicted, "mfu": mfu}
            result.tokens_per_s = tps
            result.bubble_rate_measured, result.bubble_rate_predicted = measured, predicted
            if rank == 0:
                logger.log(record)
                post = {"loss": f"{loss:.3f}", "tok/s": f"{tps:,.0f}", "bubble": f"{measured:.2f}/{predicted:.2f}"}
                if mfu is not None:
                    post["mfu"] = f"{mfu:.1%}"
                bar.set_postfix(post, refresh=False)
        bar.update(1)
        if eval_every and step % eval_every == 0 and step < steps:
            val = evaluate()
            result.val_losses[step] = val
            if rank == 0:
                logger.log({"step": step, "val_loss": val})
                bar.write(f"step {step}: loss {loss:.4f}  val_loss {val:.4f}")
        if stop_after is not None and step >= stop_after:
            bar.close()
            return result  # as if killed here: no final save
        if checkpoint["every"] and step % checkpoint["every"] == 0 and step < steps:
            result.checkpoint = save(step)
    bar.close()
    if step > start or not result.val_losses:
        val = evaluate()
        result.val_losses[step] = val
        if rank == 0:
            logger.log({"step": step, "val_loss": val})
    if checkpoint["save_final"] and (step > start or not checkpoint_steps(ckpt_dir)):
        result.checkpoint = save(step)
    if timeline and step_timeline is not None:
        if sim is None:
            measured, predicted, sim = bubble_rates(parts.plan, stepper.timeline())
        full = stepper.last_full_timeline
        if rank == 0 and full is not None:
            from pipeloom.schedules.render import render_side_by_side

            picture = os.path.join(run_dir, "timeline.png")
            render_side_by_side([(f"measured: {parts.plan.name}, step {step}, bubble rate {measured:.3f}", full),
                                 (f"simulated with the measured F/B/W: bubble rate {predicted:.3f}",
                                  Timeline(sim.timeline.intervals, sim.timeline.pp, unit="s"))],
                                picture)
            result.timeline_picture = picture
            full.chrome_trace(os.path.join(run_dir, "timeline_trace.json"))
    return result
