# The pipeline runtime: executes a lowered plan's actions on this rank's stages, with p2p, losses and updates.
"""Run any :class:`~pipeloom.schedules.ir.Plan` on real stage modules, one process per pipeline rank::

    plan = get_schedule("zb-v", pp=4, microbatches=8)
    split = split_stages(model, plan.num_stages)            # every rank builds the model and splits it
    runtime = PipelineRuntime(plan, split.for_rank(plan, rank), loss_fn=F.cross_entropy,
                              optimizer_factory=lambda ps: torch.optim.AdamW(ps, lr=1e-3), tied=split.tied)
    result = runtime.step(tokens, targets)                 # every rank passes the same batch
    result.loss                                            # the full-batch mean, on every rank
    runtime.report()                                       # predicted vs measured bubble rate (collective)

Per step: the batch is cut into ``plan.microbatches`` microbatches along dim 0 (``tensor_split``: an
uneven batch gives microbatches one row apart); extras (attention masks, position ids) with that batch
size are cut the same way, other extras reach every microbatch whole, and each layer receives the extras
its ``forward`` names. The lowered plan is then executed action by action:

* ``F`` runs the stage (the last stage also computes the loss); ``B`` computes the input gradient (only
  it, with the graph kept, when the plan has a ``W`` for that microbatch - see
  :mod:`pipeloom.parallel.backward`) or the full backward; ``W`` the parameter gradients.
* ``SEND_*``/``RECV_*`` runs of consecutive actions are posted together as batched non-blocking p2p
  calls, one per process group: each direction of each link has its own (``links="directional"``), so
  NCCL's unbuffered sends never queue behind a receive (:mod:`pipeloom.parallel.p2p`). Gradients never
  carry a shape header (their shapes are those of the activation sent forward). Activations, with
  ``shapes="cached"`` (the default), carry one only the first time their *shape key* appears: (sending
  stage, the microbatch's input signature - shapes and dtypes of its inputs and extras, and the autocast
  state - so an uneven last microbatch or a new sequence length is a new key). Every rank computes the keys
  from the batch it is given and remembers them across steps, so both ends agree which
  message carries the header (the first with a new key, in the order the receiver takes them) and the
  receiver otherwise posts the payload receive at once: one wait per activation, as in
  ``torch.distributed.pipelining``. This needs every rank to be given the batch's inputs and each stage's
  output shapes to follow from its input shapes; the sender checks that and raises
  :class:`PipelineCommError` naming the option when they do not. ``shapes="per-message"`` sends a header
  with every activation instead (data-dependent output shapes, or ranks called without the batch).
* ``UPDATE`` runs the stage's optimizer; ``RELEASE`` drops a stashed weight version
  (:mod:`pipeloom.parallel.versions`); ``SYNC_TIED`` sums tied parameters' gradients across the ranks
  holding them (in one fixed order, so the copies stay bitwise identical).

Loss normalisation: microbatch b's loss ``loss_fn(out_b, target_b)`` (a mean over its valid targets)
is multiplied by ``weight_b / weight_group``, where weight is the number of targets that count
(``!= ignore_index`` for integer targets, ``numel`` otherwise, or ``loss_weight(target)``) and the group
is the set of microbatches one UPDATE applies (all of them for synchronous plans). Summed, that is the
mean over the whole batch, so gradients equal those of the full batch through one process, however the
ignored tokens fall. Activations are dropped at the microbatch's last backward action; every action is
timed (``time.perf_counter`` on CPU, CUDA events on GPU) into a :class:`~pipeloom.schedules.timeline.Timeline`.
"""

from __future__ import annotations

import contextlib

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from pipeloom.schedules.ir import Action, Kind, Plan
from pipeloom.schedules.lowering import lower
from pipeloom.schedules.timeline import Interval, Timeline
from pipeloom.schedules.validate import validate
from torch import nn

from .backward import backward_accumulate, backward_full, backward_input, backward_weight
from .measure import ActionClock, estimate_comm
from .microbatch import batch_size, extras_for, split_batch, split_extras
from .p2p import P2P, PipelineCommError, PipelineTimeout, TensorSpec, Transfer, inbound_messages, pipeline_links
from .tied import TiedParameters
from .versions import StageVersions, update_groups

__all__ = ["PipelineCommError", "PipelineRuntime", "PipelineTimeout", "StepResult"]

SHAPE_MODES = ("cached", "per-message")  # PipelineRuntime(shapes=...): how activations' shapes travel
LINK_MODES = ("directional", "shared")  # PipelineRuntime(links=...): which process groups carry the p2p


@dataclass
class StepResult:
    """What :meth:`PipelineRuntime.step` returns on every rank.

    ``loss``: the full-batch mean loss (a float on every rank; None without targets). ``outputs``: the
    last stage's outputs concatenated over microbatches, on the rank holding the last stage when
    ``return_outputs=True``. ``timeline``: this rank's measured intervals, in seconds.
    """

    loss: float | None
    outputs: torch.Tensor | tuple | None
    timeline: Timeline


class PipelineRuntime:
    """Executes ``plan`` on this rank's stage modules; see the module docstring for the semantics.

    Args:
        plan: a compute plan (``get_schedule(...)``) or an already lowered one; it is lowered here with
            the tied stages (optimizer step, SYNC_TIED, sends/receives) and validated.
        modules: ``{stage index: nn.Module}`` for the stages ``plan`` places on this rank (or a
            :class:`~pipeloom.parallel.stage.StageSplit`, from which this rank's stages are taken).
        loss_fn: ``loss_fn(output, target) -> mean loss`` on the last stage (needed to train).
        optimizer_factory: ``f(params) -> torch.optim.Optimizer``, one per local stage; or ``optimizers``
            ``{stage: optimizer}``. Without either, UPDATE only leaves the gradients in ``.grad``.
        tied: ``[{stage: parameter name}, ...]`` (``StageSplit.tied``): parameters shared across stages.
        pp_group, pp_ranks: the pipeline process group (default: the world) and the global ranks of its
            members by pipeline rank (default: read from the group).
        timeout: seconds a rank waits for a peer before raising :class:`PipelineTimeout`.
        loss_weight, ignore_index: how many targets of a microbatch count (see module docstring).
        weight_group: the data-parallel group. Given, the counts are summed over its replicas (one all-reduce
            per step), so each microbatch is weighted by its share of the *global* batch: gradients and
            ``StepResult.loss`` are then this replica's share, and summing them over the group (not
            averaging) gives the global-batch mean exactly, whatever each replica's count.
        ordered_messages: receive each peer's messages in its send order with tag 0 (default: on NCCL only,
            which matches by order; True on gloo tests that path on CPU).
        shapes: ``"cached"`` (default): an activation's shape header is sent once per shape key (see the
            module docstring); every rank must be given the inputs. ``"per-message"``: a header before
            every activation, for stages whose output shapes depend on the data.
        links: ``"directional"`` (default): every direction of every pipeline link gets its own process
            group (:func:`~pipeloom.parallel.p2p.pipeline_links`), so NCCL's unbuffered sends cannot wait
            behind this rank's receives; building the runtime is then collective over the whole world (every
            rank builds its runtime; groups are created once per pipeline group and reused). ``"shared"``:
            every transfer on ``pp_group`` - no world collective, safe only where sends are buffered (gloo).
        around_action: ``f(action) -> context manager`` entered around every compute action this rank runs
            (e.g. to launch a stage's data-parallel gradient all-reduce during its last backward).
    """

    def __init__(self, plan: Plan, modules, loss_fn: Callable | None = None, *,
                 optimizer_factory: Callable | None = None, optimizers: Mapping | None = None,
                 tied=(), pp_group=None, pp_ranks=None, timeout: float = 300.0,
                 loss_weight: Callable | None = None, ignore_index: int = -100,
                 ordered_messages: bool | None = None, shapes: str = "cached", links: str = "directional",
                 weight_group=None, around_action: Callable | None = None):
        if shapes not in SHAPE_MODES:
            raise ValueError(f"shapes={shapes!r}; choose one of {SHAPE_MODES}")
        if links not in LINK_MODES:
            raise ValueError(f"links={links!r}; choose one of {LINK_MODES}")
        self.shapes = shapes
        self.around_action = around_action
        self.timeout = float(timeout)
        self.pp_group, self.pp_ranks, self.rank = _pipeline_group(plan, pp_group, pp_ranks)
        if hasattr(modules, "for_rank"):
            modules = modules.for_rank(plan, self.rank)
        self.modules: dict[int, nn.Module] = dict(sorted(modules.items()))
        expected = plan.stages_of(self.rank)
        if tuple(self.modules) != expected:
            raise ValueError(f"plan {plan.name!r} places stages {list(expected)} on pipeline rank {self.rank}, "
                             f"but modules for stages {list(self.modules)} were given")
        self.tied_groups = [dict(group) for group in tied]
        tied_stages = sorted({s for group in self.tied_groups for s in group})
        if self.tied_groups and plan.is_versioned:
            raise NotImplementedError("tied parameters with a weight-versioned plan (PipeDream, 2BW) are not "
                                      "supported: the tied copies would live at different versions; untie them")
        self.plan = validate(lower(plan, tuple(tied_stages)))
        self.actions = self.plan.ranks[self.rank]
        self.loss_fn, self.loss_weight, self.ignore_index = loss_fn, loss_weight, ignore_index
        self.weight_group = weight_group  # data-parallel peers whose targets share the normalisation
        if loss_fn is None and not self.plan.is_forward_only:
            raise ValueError(f"plan {plan.name!r} trains (it has backward actions): pass loss_fn")
        self.device = _device(self.modules)
        self.groups = update_groups(self.plan)
        self.last_stage = self.plan.num_stages - 1
        self.params, self.owned = _stage_params(self.modules)
        if optimizers is not None:
            self.optimizers = dict(optimizers)
        elif optimizer_factory is not None:
            self.optimizers = {s: optimizer_factory(ps) if ps else None for s, ps in self.owned.items()}
        else:
            self.optimizers = {}
        if self.plan.is_versioned and not all(self.optimizers.get(s) for s in self.modules):
            raise ValueError(f"plan {plan.name!r} updates weights during the step: pass optimizer_factory")
        self.versions = ({s: StageVersions(s, m, self.actions) for s, m in self.modules.items()}
                         if self.plan.is_versioned else {})
        self.p2p = None
        if self.plan.pp > 1:
            if ordered_messages is None:  # NCCL matches p2p messages by order and ignores tags
                ordered_messages = dist.get_backend(self.pp_group) == "nccl"
            if links == "shared" and dist.get_backend(self.pp_group) == "nccl":
                raise ValueError('links="shared" would let NCCL\'s unbuffered sends deadlock (one stream for every '
                                 'transfer); use links="directional" (the default) on NCCL')
            inbound = inbound_messages(self.plan, self.rank) if ordered_messages else None
            link_groups = (pipeline_links(self.pp_group, self.pp_ranks, _link_pairs(self.plan, self.tied_groups),
                                          self.device, self.timeout)
                           if links == "directional" else None)
            self.p2p = P2P(self.pp_group, self.pp_ranks, self.rank, self.device, self.timeout,
                           inbound=inbound, spec_of=self._gradient_specs, links=link_groups)
        self._boundaries = _forward_orders(self.plan, self.rank, bool(ordered_messages))
        self._known_shapes: set[tuple] = set()  # shape keys whose header went (or was planned) in earlier steps
        self.tied = TiedParameters(self.tied_groups, self.plan, self.rank, self.modules, self.p2p,
                                   tag_base=self._tag_count())
        self.tied.make_identical()
        self.last_timeline: Timeline | None = None
        self.peak_activations = 0.0  # of the last step, per schedules.simulate.peak_activations' units

    # ----- one step ------------------------------------------------------------------------------
    def step(self, inputs=None, targets=None, extras: Mapping | None = None,
             return_outputs: bool = False) -> StepResult:
        """Run the plan once on a batch and return the full-batch loss, outputs and measured timeline.

        Pass the same ``inputs`` (stage 0's arguments), ``targets`` (the last stage's) and ``extras`` on
        every rank; each uses what its stages need (the batch size is read from inputs or targets, so a
        rank given neither cannot split tensor extras). Gradients are zeroed at the start of the step;
        after a synchronous plan they stay in ``.grad`` (UPDATE steps the optimizer without zeroing).
        """
        plan, m = self.plan, self.plan.microbatches
        training = not plan.is_forward_only
        holds_first, holds_last = 0 in self.modules, self.last_stage in self.modules
        if holds_first and inputs is None:
            raise ValueError(f"pipeline rank {self.rank} holds stage 0 and needs the inputs")
        if holds_last and training and targets is None:
            raise ValueError(f"pipeline rank {self.rank} holds the last stage and needs targets to train")
        cached = self.p2p is not None and self.shapes == "cached"
        if cached and inputs is None:
            raise ValueError(f"pipeline rank {self.rank} was given no inputs: with shapes='cached' (the default) "
                             f"every rank derives the activation shapes from the microbatches' input shapes; pass "
                             f"the same inputs on every rank, or build the runtime with shapes='per-message'")
        inputs_mb = split_batch(inputs, m, "inputs") if holds_first or cached else None
        self._inputs_mb = inputs_mb if holds_first else None
        self._targets_mb = split_batch(targets, m, "targets") if holds_last and targets is not None else None
        self._extras_mb = split_extras(extras, m, batch_size(inputs, targets))
        self._weights = self._loss_weights() if self._targets_mb is not None else None
        self._state: dict = {}
        self._held = self._peak = 0  # microbatch activations held (forward done, last backward not yet)
        self._loss_sum = None
        self._outputs: list = [None] * m if (return_outputs and holds_last) else None
        for module in self.modules.values():
            module.zero_grad(set_to_none=True)
        for versions in self.versions.values():
            versions.begin()
        self.tied.begin()
        if self.p2p is not None:
            self.p2p.reset(self._forward_messages(inputs_mb if cached else None))
        clock = ActionClock(self.device)
        records = []
        i = 0
        while i < len(self.actions):
            a = self.actions[i]
            if a.kind.is_comm:
                j = i
                while j < len(self.actions) and self.actions[j].kind.is_comm:
                    j += 1
                start = clock.host()
                transfers = [self._transfer(x) for x in self.actions[i:j]]
                self.p2p.exchange(transfers)
                for t in transfers:
                    self._received(t)
                    records.append((t.action, start, t.done, True))
                self.p2p.prune()
                i = j
                continue
            start = clock.mark()
            with torch.set_grad_enabled(training), (self.around_action(a) if self.around_action else _nothing()):
                self._run(a)
            records.append((a, start, clock.mark(), False))
            i += 1
        if self.p2p is not None:
            self.p2p.drain()
        for versions in self.versions.values():
            versions.end()
        leftover = sorted(k for k, v in self._state.items() if v is not None)
        if leftover:
            raise RuntimeError(f"plan {plan.name!r} left state on pipeline rank {self.rank}: {leftover[:6]}")
        loss = self._broadcast_loss() if self.loss_fn is not None else None
        timeline = Timeline(tuple(Interval(self.rank, a, *clock.times(s, e, host)) for a, s, e, host in records),
                            pp=plan.pp, unit="s")
        self.last_timeline = timeline
        # In full-stage units like schedules.simulate.peak_activations: a chunk counts 1/v.
        self.peak_activations = self._peak / len(self.modules)
        outputs = None
        if self._outputs is not None:
            parts = self._outputs
            outputs = (tuple(torch.cat(c) for c in zip(*parts)) if isinstance(parts[0], tuple) else torch.cat(parts))
        return StepResult(loss=loss, outputs=outputs, timeline=timeline)

    def _run(self, a: Action) -> None:
        k = a.kind
        if k is Kind.F:
            self._forward(a)
        elif k is Kind.B:
            self._backward(a)
        elif k is Kind.W:
            grads = backward_weight(self._state.pop(("w", a.stage, a.microbatch)))
            _accumulate(self._state.pop(("live", a.stage, a.microbatch)), grads)
            self._held -= 1
        elif k is Kind.UPDATE:
            self._update(a)
        elif k is Kind.RELEASE:
            self.versions[a.stage].release(a.version)
        elif k is Kind.SYNC_TIED:
            self.tied.sync(a.stage)

    def _forward(self, a: Action) -> None:
        s, mb = a.stage, a.microbatch
        training = not self.plan.is_forward_only
        if s == 0:
            args = self._inputs_mb[mb] if isinstance(self._inputs_mb[mb], tuple) else (self._inputs_mb[mb],)
        elif s - 1 in self.modules:  # the previous stage runs here: cut the graph at the stage boundary
            key = ("out", s - 1, mb)  # kept for that stage's backward when training
            outs = self._state[key] if training else self._state.pop(key)
            args = tuple(_leaf(t, training and torch.is_tensor(t) and t.requires_grad) for t in outs)
        else:
            args = self._state.pop(("recv", s, mb))
        module = self.modules[s]
        kwargs = extras_for(module, self._extras_mb[mb])
        params = self.versions[s].tensors(a.version) if self.versions else None
        if params is None:
            out = module(*args, **kwargs)
            used = self.params[s]
        else:
            out = torch.func.functional_call(module, params, args, kwargs)
            used = [params[n] for n in self.versions[s].names]
        outs = out if isinstance(out, tuple) else (out,)
        if training:
            self._held += 1
            self._peak = max(self._peak, self._held)
            self._state[("in", s, mb)] = args
            self._state[("used", s, mb)] = used
            self._state[("live", s, mb)] = self.params[s]
        if s == self.last_stage:
            if self._outputs is not None:
                self._outputs[mb] = tuple(o.detach() for o in outs) if isinstance(out, tuple) else out.detach()
            if self._weights is not None:
                loss = self._loss(out, mb)
                if training:
                    self._state[("loss", s, mb)] = loss
        else:
            self._state[("out", s, mb)] = outs

    def _loss(self, out, mb: int) -> torch.Tensor:
        """This microbatch's share of its update group's mean loss (backward starts here)."""
        weight, group_weight, total = self._weights[mb]
        target = self._targets_mb[mb]
        if weight == 0:  # all targets ignored: no loss, but keep the graph for a zero gradient
            outs = out if isinstance(out, tuple) else (out,)
            scaled = sum(o.sum() for o in outs if torch.is_tensor(o) and o.is_floating_point()) * 0.0
            value = torch.zeros((), dtype=torch.float64, device=self.device)
        else:
            loss = self.loss_fn(out, target)
            scaled = loss * (weight / group_weight)
            value = loss.detach().double() * (weight / total)
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        return scaled

    def _backward(self, a: Action) -> None:
        s, mb = a.stage, a.microbatch
        if s == self.last_stage:
            outputs, grads = [self._state.pop(("loss", s, mb))], [None]
        else:
            outs = self._state.pop(("out", s, mb))
            received = iter(self._state.pop(("gout", s, mb)))
            outputs, grads = [], []
            for o in outs:
                if torch.is_tensor(o) and o.requires_grad:
                    outputs.append(o)
                    grads.append(next(received))
        args = self._state.pop(("in", s, mb))
        wrt = [x for x in args if torch.is_tensor(x) and x.requires_grad] if s > 0 else []
        used = self._state.pop(("used", s, mb))
        if self.plan.splits_backward(s, mb):
            in_grads, state = backward_input(outputs, grads, wrt, used)
            self._state[("w", s, mb)] = state
        else:
            live = self._state.pop(("live", s, mb))
            if used is live:  # the live parameters ran the forward: autograd accumulates into .grad itself
                in_grads = backward_accumulate(outputs, grads, wrt, used)
            else:  # a stashed version ran it (PipeDream): its gradients go to the live parameters
                in_grads, param_grads = backward_full(outputs, grads, wrt, used)
                _accumulate(live, param_grads)
            self._held -= 1
        if s > 0:
            in_grads = [g if g is not None else torch.zeros_like(x) for g, x in zip(in_grads, wrt)]
            key = ("gout", s - 1, mb) if s - 1 in self.modules else ("gin", s, mb)
            self._state[key] = in_grads

    def _update(self, a: Action) -> None:
        optimizer = self.optimizers.get(a.stage)
        if not self.versions:
            if optimizer is not None:
                optimizer.step()
            return

        def step() -> None:
            optimizer.step()
            for p in self.params[a.stage]:
                p.grad = None

        self.versions[a.stage].update(a.version, step)

    # ----- communication -------------------------------------------------------------------------
    def _tag(self, stage: int, backward: bool, mb: int) -> int:
        return 1 + (stage * 2 + int(backward)) * self.plan.microbatches + mb

    def _tag_count(self) -> int:
        return 2 + 2 * self.plan.num_stages * self.plan.microbatches

    def _forward_messages(self, inputs_mb) -> dict[tuple, tuple]:
        """Per forward message ``(True, sending stage, mb)`` this rank sends or receives this step: (shape
        key, header?). Cached (``inputs_mb`` given): the key is (sending stage, the microbatch's input
        signature) and a header goes with the first message of a key not seen in an earlier step, in the
        order the receiver takes them; both ends compute the same from the plan, the batch and the keys
        of earlier steps. Per-message (``inputs_mb`` None): no key, a header on every message."""
        out = {}
        if inputs_mb is None:
            for s, order in self._boundaries.items():
                out.update({(True, s, mb): (None, True) for mb in order})
            return out
        device = self.device.type  # autocast changes output dtypes: its state is part of the key
        amp = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        signatures = [(amp, *_signature(x, extras)) for x, extras in zip(inputs_mb, self._extras_mb)]
        for s, order in self._boundaries.items():
            for mb in order:
                key = (s, signatures[mb])
                out[(True, s, mb)] = (key, key not in self._known_shapes)
                self._known_shapes.add(key)
        return out

    def _transfer(self, a: Action) -> Transfer:
        s, mb, k = a.stage, a.microbatch, a.kind
        if k is Kind.SEND_F:
            outs = self._state[("out", s, mb)] if not self.plan.is_forward_only else self._state.pop(("out", s, mb))
            shape_key, header = self.p2p.forward[(True, s, mb)]
            return Transfer(a, True, self.plan.rank_of(s + 1), self._tag(s, False, mb), list(outs), header=header,
                            key=(True, s, mb), shape_key=shape_key)
        if k is Kind.RECV_F:
            shape_key, header = self.p2p.forward[(True, s - 1, mb)]
            return Transfer(a, False, self.plan.rank_of(s - 1), self._tag(s - 1, False, mb), header=header,
                            key=(True, s - 1, mb), shape_key=shape_key)
        if k is Kind.SEND_B:
            grads = self._state.pop(("gin", s, mb))
            return Transfer(a, True, self.plan.rank_of(s - 1), self._tag(s, True, mb), grads, key=(False, s, mb))
        return Transfer(a, False, self.plan.rank_of(s + 1), self._tag(s + 1, True, mb),
                        specs=self._gradient_specs((False, s + 1, mb)), key=(False, s + 1, mb))

    def _gradient_specs(self, key: tuple) -> list[TensorSpec]:
        """Shapes of the gradient message ``key`` = (False, sending stage, mb): our outputs needing grad."""
        _, sender, mb = key
        return [TensorSpec(tuple(o.shape), o.dtype) for o in self._state[("out", sender - 1, mb)]
                if torch.is_tensor(o) and o.requires_grad]

    def _received(self, t: Transfer) -> None:
        if t.send:
            return
        s, mb = t.action.stage, t.action.microbatch
        if t.action.kind is Kind.RECV_F:
            training = not self.plan.is_forward_only
            self._state[("recv", s, mb)] = tuple(_leaf(x, spec.requires_grad and training)
                                                 for x, spec in zip(t.tensors, t.specs))
        else:
            self._state[("gout", s, mb)] = t.tensors

    def _broadcast_loss(self) -> float | None:
        """The full-batch mean loss from the last stage's rank to every rank (None without targets)."""
        value = torch.zeros(2, dtype=torch.float64, device=self.device)  # (has a loss, loss)
        if self._loss_sum is not None:
            value[0], value[1] = 1.0, self._loss_sum.detach()
        if self.plan.pp > 1:
            src = self.pp_ranks[self.plan.rank_of(self.last_stage)]
            dist.broadcast(value, src=src, group=self.pp_group)
        has_loss, loss = value.tolist()
        return loss if has_loss else None

    def _loss_weights(self) -> list[tuple[float, float, float]]:
        """Per microbatch: (its weight, its update group's weight, the whole batch's weight); with
        ``weight_group``, the group's and the batch's weights are summed over every replica's batch."""
        weights = [float(self._weight_of(t)) for t in self._targets_mb]
        summed = weights
        if self.weight_group is not None and dist.get_world_size(self.weight_group) > 1:
            counts = torch.tensor(weights, dtype=torch.float64, device=self.device)
            dist.all_reduce(counts, group=self.weight_group)  # one small all-reduce per step
            summed = counts.tolist()
        total = sum(summed)
        out = [None] * len(weights)
        for group in self.groups:
            group_weight = sum(summed[b] for b in group)
            for b in group:
                out[b] = (weights[b], group_weight, total)
        return out

    def _weight_of(self, target) -> float:
        if self.loss_weight is not None:
            return self.loss_weight(target)
        if torch.is_tensor(target):
            if target.is_floating_point():
                return target.numel()
            return int((target != self.ignore_index).sum())
        return 1.0

    # ----- measurement ---------------------------------------------------------------------------
    def gather_timeline(self) -> Timeline:
        """The last step's intervals of every pipeline rank (a collective: every rank must call it)."""
        if self.last_timeline is None:
            raise RuntimeError("gather_timeline() needs a step() first")
        records = self.last_timeline.to_records()
        if self.plan.pp > 1:
            gathered = [None] * self.plan.pp
            dist.all_gather_object(gathered, records, group=self.pp_group)
            records = [r for part in gathered for r in part]
        return Timeline.from_records(records, pp=self.plan.pp, unit="s")

    def report(self, timeline: Timeline | None = None, comm: float | None = None) -> dict:
        """Predicted vs measured bubble rate: measured per-chunk F/B/W costs fed back into the simulator.

        Collective unless ``timeline`` (a gathered one) is given. ``comm`` is the latency the simulator
        adds on every cross-rank edge, in seconds; None estimates it from the run (the median time from
        a send being posted to its receive completing - clocks of one host only; pass it for several
        hosts). Returns the ``measured`` and ``predicted`` bubble rates (Zero Bubble's r, arXiv 2401.10241 §5.3),
        both makespans (seconds), ``comm`` and the per-chunk ``costs``.
        """
        from pipeloom.schedules.simulate import Costs, simulate

        timeline = timeline or self.gather_timeline()
        costs = timeline.stage_costs(self.plan)
        comm = estimate_comm(timeline) if comm is None else comm
        sim = simulate(self.plan, Costs(F=list(costs["F"]), B=list(costs["B"]), W=list(costs["W"]), comm=comm))
        return {"measured": timeline.bubble_rate(), "predicted": sim.bubble_rate,
                "measured_makespan": timeline.makespan, "predicted_makespan": sim.makespan, "comm": comm,
                "costs": costs}


# ----- helpers -----------------------------------------------------------------------------------------


def _pipeline_group(plan: Plan, pp_group, pp_ranks):
    """(group, global ranks by pipeline rank, this process's pipeline rank), checked against the plan."""
    if not dist.is_available() or not dist.is_initialized():
        if plan.pp != 1:
            raise RuntimeError(f"plan {plan.name!r} is for {plan.pp} pipeline ranks but torch.distributed is not "
                               f"initialised; launch {plan.pp} processes (torchrun --nproc_per_node={plan.pp}) "
                               f"and call dist.init_process_group first")
        if pp_ranks not in (None, [0], (0,)):
            raise ValueError(f"pp_ranks={pp_ranks} without torch.distributed; a single process is pp_ranks=[0]")
        return None, [0], 0
    group = pp_group if pp_group is not None else dist.group.WORLD
    members = dist.get_process_group_ranks(group)
    size = len(members)
    if plan.pp != size:
        raise ValueError(f"plan {plan.name!r} is for {plan.pp} pipeline ranks, but the pipeline group has {size} "
                         f"(world size {dist.get_world_size()}); build the plan with pp={size} or launch "
                         f"{plan.pp} ranks per pipeline")
    if pp_ranks is not None and list(pp_ranks) != members:
        raise ValueError(f"pp_ranks={list(pp_ranks)} does not match the pipeline group's members {members} "
                             f"(global ranks ordered by pipeline rank)")
    me = dist.get_rank()
    if me not in members:
        raise ValueError(f"global rank {me} is not a member of the pipeline group {members}")
    return group, members, members.index(me)


def _link_pairs(plan: Plan, tied_groups) -> set[tuple[int, int]]:
    """The (sender, receiver) pipeline-rank pairs a lowered plan's messages and tied groups use."""
    pairs = {(peer, rank) for rank in range(plan.pp) for peer in inbound_messages(plan, rank)}
    for group in tied_groups:
        holders = sorted({plan.rank_of(s) for s in group})
        pairs.update((a, b) for a in holders for b in holders if a != b)
    return pairs


def _forward_orders(plan: Plan, rank: int, ordered: bool) -> dict[int, list[int]]:
    """Per stage boundary s -> s+1 between this rank and another: its microbatches in the order the
    receiver takes them (the sender's SEND_F order when ``ordered``, else the receiver's RECV_F order)."""
    orders = {}
    for s in range(plan.num_stages - 1):
        src, dst = plan.rank_of(s), plan.rank_of(s + 1)
        if src == dst or rank not in (src, dst):
            continue
        if ordered:
            orders[s] = [a.microbatch for a in plan.ranks[src] if a.kind is Kind.SEND_F and a.stage == s]
        else:
            orders[s] = [a.microbatch for a in plan.ranks[dst] if a.kind is Kind.RECV_F and a.stage == s + 1]
    return orders


def _signature(inputs, extras: Mapping) -> tuple:
    """A microbatch's input signature: what its activations' shapes may follow from (shapes, dtypes)."""
    parts = inputs if isinstance(inputs, tuple) else (inputs,)
    return tuple(_describe(x) for x in parts), tuple((name, _describe(v)) for name, v in sorted(extras.items()))


def _describe(x):
    if torch.is_tensor(x):
        return tuple(x.shape), x.dtype
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return type(x).__qualname__


def _device(modules: Mapping[int, nn.Module]) -> torch.device:
    devices = {p.device for m in modules.values() for p in m.parameters()}
    if len(devices) > 1:
        raise ValueError(f"this rank's stages have parameters on several devices {sorted(map(str, devices))}; "
                         f"move each rank's stages to one device")
    return devices.pop() if devices else torch.device("cpu")


def _stage_params(modules: Mapping[int, nn.Module]):
    """Per stage: every trainable parameter it uses, and the ones its optimizer owns (shared once)."""
    used, owned, seen = {}, {}, set()
    for s, module in modules.items():
        used[s] = [p for p in module.parameters() if p.requires_grad]
        owned[s] = [p for p in used[s] if id(p) not in seen]
        seen.update(id(p) for p in used[s])
    return used, owned


_nothing = contextlib.nullcontext


def _accumulate(params, grads) -> None:
    fresh = [(p, g) for p, g in zip(params, grads) if g is not None and p.grad is None]
    more = [(p, g) for p, g in zip(params, grads) if g is not None and p.grad is not None]
    for p, g in fresh:
        p.grad = g
    if more:
        torch._foreach_add_([p.grad for p, _ in more], [g for _, g in more])


def _leaf(t, requires_grad: bool):
    if not torch.is_tensor(t):
        return t
    return t.detach().requires_grad_(requires_grad and (t.is_floating_point() or t.is_complex()))


