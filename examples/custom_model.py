# Example: train your own layer stack with any pipeline schedule: torchrun --nproc_per_node=4 custom_model.py.
"""A user-defined model (not from ``pipeloom.models``) trained with a schedule chosen by name::

    torchrun --nproc_per_node=4 examples/custom_model.py --schedule zb-v
    torchrun --nproc_per_node=2 examples/custom_model.py --schedule 1f1b --check

Every rank builds the same model (same seed), splits it into ``plan.num_stages`` stages and keeps the
ones the plan places on it. ``--check`` (synchronous schedules) also runs a single-process deep copy on
the same batch and prints the largest absolute difference of the loss and of every parameter's gradient
after one step. The run ends with the bubble rate measured on this run next to the one the simulator
predicts from the measured per-stage costs.
"""

import argparse
import copy
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pipeloom.parallel import PipelineRuntime, split_stages
from pipeloom.schedules import get_schedule, list_schedules
from torch import nn


class TokenEmbedding(nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.table = nn.Embedding(vocab, dim)
        nn.init.normal_(self.table.weight, std=0.02)  # also the output head's weight when tied

    def forward(self, tokens):  # (B, T) long -> (B, T, D)
        return self.table(tokens)


class GatedBlock(nn.Module):
    """Pre-norm residual block: a causal running mean over time, then a gated MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.gate = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, mask=None):  # (B, T, D) -> (B, T, D); mask (B, T) drops padding
        h = self.norm(x)
        if mask is not None:
            h = h * mask[..., None]
        h = h.cumsum(1) / torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[:, None]
        a, b = self.gate(h).chunk(2, dim=-1)  # (B, T, D) each
        return x + self.out(F.silu(a) * b)


class OutputHead(nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, vocab, bias=False)

    def forward(self, x):  # (B, T, D) -> (B, T, V)
        return self.proj(self.norm(x))


def build_model(vocab: int, dim: int, blocks: int, tie: bool) -> nn.Sequential:
    layers = [TokenEmbedding(vocab, dim), *[GatedBlock(dim) for _ in range(blocks)], OutputHead(vocab, dim)]
    if tie:
        layers[-1].proj.weight = layers[0].table.weight  # declared once; split_stages finds it
    return nn.Sequential(*layers)


def loss_fn(logits, targets):  # mean over targets != -100, at least in float32
    logits = logits.flatten(0, 1)  # (B*T, V)
    return F.cross_entropy(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits,
                           targets.flatten(), ignore_index=-100)


def make_batch(step: int, batch: int, seq: int, vocab: int, device):
    """Same batch on every rank: predict the next token of a noisy counting sequence; some padding."""
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    tokens = (start + torch.arange(seq + 1)) % vocab  # (B, T+1)
    tokens[:, 1:] = torch.where(torch.rand(batch, seq, generator=g) < 0.1, torch.randint_like(tokens[:, 1:], vocab),
                                tokens[:, 1:])
    mask = torch.ones(batch, seq)
    mask[0, seq // 2:] = 0  # the first row is half padding
    targets = tokens[:, 1:].masked_fill(mask == 0, -100)
    return tokens[:, :-1].to(device), targets.to(device), {"mask": mask.to(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", default="1f1b", choices=list_schedules())
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--vpp", type=int, default=None, help="chunks per rank (interleaved-1f1b)")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=97)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--split", default="parameters", help="uniform, parameters, time, or counts like 3,4,4,3")
    parser.add_argument("--untied", action="store_true", help="do not tie the embedding and the output head")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--check", action="store_true", help="compare one step with a single-process copy")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = getattr(torch, args.dtype)

    plan = get_schedule(args.schedule, pp=world, microbatches=args.microbatches, vpp=args.vpp)
    torch.manual_seed(0)  # the same model on every rank
    tie = not args.untied and not plan.is_versioned  # tied copies would live at different weight versions
    model = build_model(args.vocab, args.dim, args.blocks, tie=tie).to(device, dtype)
    reference = copy.deepcopy(model) if args.check else None
    method = [int(c) for c in args.split.split(",")] if "," in args.split else args.split
    sample = make_batch(0, args.batch // args.microbatches, args.seq, args.vocab, device)[0]
    split = split_stages(model, plan.num_stages, method=method, sample_input=sample)
    if rank == 0:
        print(f"{plan.name}: pp={plan.pp} stages={plan.num_stages} microbatches={plan.microbatches}\n{split}")
    runtime = PipelineRuntime(plan, split.for_rank(plan, rank), loss_fn, tied=split.tied,
                              optimizer_factory=lambda ps: torch.optim.AdamW(ps, lr=3e-3))

    for step in range(1 if args.check else args.steps):
        tokens, targets, extras = make_batch(step, args.batch, args.seq, args.vocab, device)
        result = runtime.step(tokens, targets, extras)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {result.loss:.4f}")
    if args.check:
        check(runtime, reference, plan, tokens, targets, extras, result.loss, rank)
    report = runtime.report()
    if rank == 0:
        print(f"bubble rate (Zero Bubble r): measured {report['measured']:.3f}, simulator on measured costs "
              f"{report['predicted']:.3f} (comm {report['comm'] * 1e6:.0f} us, makespan measured "
              f"{report['measured_makespan'] * 1e3:.1f} ms, predicted {report['predicted_makespan'] * 1e3:.1f} ms)")
    if dist.is_initialized():
        dist.destroy_process_group()


def check(runtime, reference, plan, tokens, targets, extras, loss, rank) -> None:
    """Largest |difference| of the loss and of each parameter's gradient against one process."""
    if plan.is_versioned:
        if rank == 0:
            print(f"--check compares synchronous schedules; {plan.name} updates weights inside the step")
        return
    h = tokens
    for layer in reference:
        h = layer(h, mask=extras["mask"]) if isinstance(layer, GatedBlock) else layer(h)
    ref_loss = loss_fn(h, targets)
    ref_loss.backward()
    ref_params = dict(reference.named_parameters(remove_duplicate=False))
    mine = {name: ((p.grad - ref_params[name].grad).abs().max().item(), ref_params[name].grad.abs().max().item())
            for module in runtime.modules.values() for name, p in module.named_parameters()}
    gathered = [None] * plan.pp
    if dist.is_initialized():
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    if rank == 0:
        diffs = {name: d for part in gathered for name, d in part.items()}
        print(f"check: loss {loss:.6f} vs one process {ref_loss.item():.6f}, |diff| {abs(loss - ref_loss.item()):.3g}")
        for name in sorted(diffs, key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")]):
            print(f"  grad {name:<18} max |diff| {diffs[name][0]:.3g}  (max |grad| {diffs[name][1]:.3g})")
        print(f"check: largest gradient |diff| {max(d for d, _ in diffs.values()):.3g} over {len(diffs)} parameters")


if __name__ == "__main__":
    main()
