# One rank's lowered actions compiled once into a flat list of operations, and the per-step state they use.
"""What :class:`~pipeloom.parallel.runtime.PipelineRuntime` executes every step.

Reading a plan action by action costs Python time on the critical path of every microbatch: which kind
it is, which stage holds the input, which rank and tag a message goes to, whether the plan trains. All
of that is fixed by the plan, so it is worked out once, when the runtime is built: each action becomes
an ``(operation, info)`` pair whose info holds the module, the neighbours, the tags and flags, and each
run of consecutive sends and receives becomes one operation (which, with ``early_receives``, also posts
the receives of the *next* run, :meth:`~pipeloom.parallel.p2p.P2P.exchange`). A step then is a loop over
that list. Per step and microbatch the state lives in :class:`Slot` objects (one per local
stage and microbatch) instead of a dict keyed by tuples.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch
from pipeloom.schedules.ir import Action, Kind

from .backward import backward_accumulate, backward_full, backward_input, backward_weight
from .p2p import TensorSpec, Transfer

__all__ = ["Program", "Slot"]


class Slot:
    """What one local stage holds for one microbatch during a step (None when not held)."""

    __slots__ = ("args", "out", "used", "live", "loss", "recv", "gout", "gin", "wstate")
    FIELDS = __slots__

    def __init__(self):
        self.args = self.out = self.used = self.live = self.loss = None
        self.recv = self.gout = self.gin = self.wstate = None


class Fwd(NamedTuple):
    action: Action
    stage: int
    mb: int
    module: object
    accepts: frozenset | None  # extras the stage takes (None: all)
    first: bool  # stage 0: reads the inputs
    local_prev: bool  # the previous stage runs on this rank: its output is passed locally
    last: bool  # the last stage: computes the loss
    version: int | None


class Bwd(NamedTuple):
    action: Action
    stage: int
    mb: int
    last: bool
    split: bool  # a W follows: B computes input gradients only
    first: bool
    local_prev: bool


class Msg(NamedTuple):
    action: Action
    kind: Kind
    stage: int
    mb: int
    peer: int  # pipeline rank
    tag: int
    key: tuple  # (forward, sending stage, microbatch)


class Run(NamedTuple):
    actions: tuple
    msgs: tuple  # Msg of this run
    ahead: tuple  # receive Msgs of the next run, posted early


class Program:
    """A rank's compiled actions and the state of the step being run; the runtime owns one."""

    def __init__(self, rt, actions, early_receives: bool = False):
        self.rt = rt
        self.training = not rt.plan.is_forward_only
        self.p2p = rt.p2p
        self.early_receives = early_receives
        self.ops = self._compile(list(actions))

    # ----- compile ----------------------------------------------------------------------------------
    def _compile(self, actions: list) -> list:
        rt, plan, local = self.rt, self.rt.plan, self.rt.modules
        last = plan.num_stages - 1
        accepts = {s: _accepts(m) for s, m in local.items()}
        ops, i = [], 0
        runs = []
        while i < len(actions):
            a = actions[i]
            if a.kind.is_comm:
                j = i
                while j < len(actions) and actions[j].kind.is_comm:
                    j += 1
                runs.append((len(ops), tuple(actions[i:j])))
                ops.append(None)  # filled below, when the next run is known
                i = j
                continue
            s, mb = a.stage, a.microbatch
            if a.kind is Kind.F:
                info = Fwd(a, s, mb, local[s], accepts[s], s == 0, s > 0 and s - 1 in local, s == last, a.version)
                ops.append((self._forward, info, a))
            elif a.kind is Kind.B:
                info = Bwd(a, s, mb, s == last, plan.splits_backward(s, mb), s == 0, s > 0 and s - 1 in local)
                ops.append((self._backward, info, a))
            else:
                fn = {Kind.W: self._weight, Kind.UPDATE: rt._update, Kind.RELEASE: self._release,
                      Kind.SYNC_TIED: self._sync_tied}[a.kind]
                ops.append((fn, a, a))
            i += 1
        msgs = [tuple(self._msg(a) for a in run) for _, run in runs]
        for n, (k, run) in enumerate(runs):
            later = msgs[n + 1] if n + 1 < len(runs) and self.early_receives else ()
            ahead = tuple(m for m in later if m.kind in (Kind.RECV_F, Kind.RECV_B))
            ops[k] = (self._comm, Run(run, msgs[n], ahead), None)  # no action: a run records its transfers
        return ops

    def _msg(self, a: Action) -> Msg:
        plan, s, mb, k = self.rt.plan, a.stage, a.microbatch, a.kind
        m = plan.microbatches

        def tag(stage, backward):
            return 1 + (stage * 2 + int(backward)) * m + mb

        if k is Kind.SEND_F:
            return Msg(a, k, s, mb, plan.rank_of(s + 1), tag(s, False), (True, s, mb))
        if k is Kind.RECV_F:
            return Msg(a, k, s, mb, plan.rank_of(s - 1), tag(s - 1, False), (True, s - 1, mb))
        if k is Kind.SEND_B:
            return Msg(a, k, s, mb, plan.rank_of(s - 1), tag(s, True), (False, s, mb))
        return Msg(a, k, s, mb, plan.rank_of(s + 1), tag(s + 1, True), (False, s + 1, mb))

    # ----- one step ---------------------------------------------------------------------------------
    def begin(self, inputs_mb, targets_mb, extras_mb, weights, outputs) -> None:
        m = self.rt.plan.microbatches
        self.slots = {s: [Slot() for _ in range(m)] for s in self.rt.modules}
        self.inputs_mb, self.targets_mb, self.extras_mb = inputs_mb, targets_mb, extras_mb
        self.weights, self.outputs = weights, outputs
        self.losses: list = []  # (microbatch, its detached loss) on the last stage
        self.held = self.peak = 0  # microbatch activations held (forward done, last backward not yet)
        self.records = None

    def end(self) -> None:
        """Drop the step's references (activations, losses, batch)."""
        self.slots, self.inputs_mb, self.targets_mb, self.extras_mb, self.outputs, self.losses = {}, None, None, \
            None, None, []

    def run(self, clock=None, around=None) -> list | None:
        """Execute every operation; with ``clock``, return the timeline records ``(action, start, end, host)``.
        ``around(action)``: a context manager entered around every compute action (the runtime's
        ``around_action``)."""
        with torch.set_grad_enabled(self.training):
            if clock is None and around is None:
                for op, info, _ in self.ops:
                    op(info)
                return None
            self.records = records = [] if clock is not None else None
            for op, info, action in self.ops:
                if action is None:
                    op(info)
                    continue
                start = clock.mark() if clock is not None else None
                if around is None:
                    op(info)
                else:
                    with around(action):
                        op(info)
                if clock is not None:
                    records.append((action, start, clock.mark(), False))
            self.records = None
            return records

    def leftover(self) -> list:
        """State a step left behind (a plan that does not free what it holds): ``(field, stage, mb)``."""
        return sorted((name, s, mb) for s, slots in self.slots.items() for mb, slot in enumerate(slots)
                      for name in Slot.FIELDS if getattr(slot, name) is not None)

    # ----- compute ----------------------------------------------------------------------------------
    def _forward(self, f: Fwd) -> None:
        s, mb, training = f.stage, f.mb, self.training
        slot = self.slots[s][mb]
        if f.first:
            x = self.inputs_mb[mb]
            args = x if isinstance(x, tuple) else (x,)
        elif f.local_prev:  # the previous stage runs here: cut the graph at the stage boundary
            prev = self.slots[s - 1][mb]
            outs = prev.out  # kept for that stage's backward when training
            if not training:
                prev.out = None
            args = tuple(_leaf(t, training and torch.is_tensor(t) and t.requires_grad) for t in outs)
        else:
            args, slot.recv = slot.recv, None
        extras = self.extras_mb[mb]
        if extras and f.accepts is not None:
            extras = {k: v for k, v in extras.items() if k in f.accepts}
        versions = self.rt.versions.get(s) if self.rt.versions else None
        params = versions.tensors(f.version) if versions is not None else None
        if params is None:
            out = f.module(*args, **extras)
            used = self.rt.params[s]
        else:
            out = torch.func.functional_call(f.module, params, args, extras)
            used = [params[n] for n in versions.names]
        outs = out if isinstance(out, tuple) else (out,)
        if training:
            self.held += 1
            if self.held > self.peak:
                self.peak = self.held
            slot.args, slot.used, slot.live = args, used, self.rt.params[s]
        if f.last:
            if self.outputs is not None:
                self.outputs[mb] = tuple(o.detach() for o in outs) if isinstance(out, tuple) else out.detach()
            if self.weights is not None:
                loss = self._loss(out, mb)
                if training:
                    slot.loss = loss
        else:
            slot.out = outs

    def _loss(self, out, mb: int) -> torch.Tensor:
        """This microbatch's share of its update group's mean loss (backward starts here)."""
        weight, group_weight, _ = self.weights[mb]
        if weight == 0:  # all targets ignored: no loss, but keep the graph for a zero gradient
            outs = out if isinstance(out, tuple) else (out,)
            return sum(o.sum() for o in outs if torch.is_tensor(o) and o.is_floating_point()) * 0.0
        loss = self.rt.loss_fn(out, self.targets_mb[mb])
        self.losses.append((mb, loss.detach()))
        return loss * (weight / group_weight)

    def loss_sum(self):
        """The full-batch mean of this step's microbatch losses (float64, on the device), or None."""
        if not self.losses:
            return None if self.weights is None else torch.zeros((), dtype=torch.float64, device=self.rt.device)
        values = torch.stack([v.reshape(()) for _, v in self.losses]).double()  # (microbatches with targets,)
        shares = torch.tensor([self.weights[mb][0] / self.weights[mb][2] for mb, _ in self.losses],
                              dtype=torch.float64, device=values.device)
        return (values * shares).sum()

    def _backward(self, b: Bwd) -> None:
        s, mb = b.stage, b.mb
        slot = self.slots[s][mb]
        if b.last:
            outputs, grads = [slot.loss], [None]
            slot.loss = None
        else:
            outs, received = slot.out, iter(slot.gout)
            slot.out = slot.gout = None
            outputs, grads = [], []
            for o in outs:
                if torch.is_tensor(o) and o.requires_grad:
                    outputs.append(o)
                    grads.append(next(received))
        args, used = slot.args, slot.used
        slot.args = slot.used = None
        wrt = [x for x in args if torch.is_tensor(x) and x.requires_grad] if not b.first else []
        if b.split:
            in_grads, slot.wstate = backward_input(outputs, grads, wrt, used)
        else:
            live, slot.live = slot.live, None
            if used is live:  # the live parameters ran the forward: autograd accumulates into .grad itself
                in_grads = backward_accumulate(outputs, grads, wrt, used)
            else:  # a stashed version ran it (PipeDream): its gradients go to the live parameters
                in_grads, param_grads = backward_full(outputs, grads, wrt, used)
                _accumulate(live, param_grads)
            self.held -= 1
        if not b.first:
            in_grads = [g if g is not None else torch.zeros_like(x) for g, x in zip(in_grads, wrt)]
            if b.local_prev:
                self.slots[s - 1][mb].gout = in_grads
            else:
                slot.gin = in_grads

    def _weight(self, a: Action) -> None:
        slot = self.slots[a.stage][a.microbatch]
        grads = backward_weight(slot.wstate)
        _accumulate(slot.live, grads)
        slot.wstate = slot.live = None
        self.held -= 1

    def _release(self, a: Action) -> None:
        self.rt.versions[a.stage].release(a.version)

    def _sync_tied(self, a: Action) -> None:
        self.rt.tied.sync(a.stage)

    # ----- communication ----------------------------------------------------------------------------
    def _comm(self, run: Run) -> None:
        start = time.perf_counter()
        transfers = [self._transfer(m) for m in run.msgs]
        ahead = [t for t in (self._receive(m) for m in run.ahead) if t is not None] if run.ahead else ()
        self.p2p.exchange(transfers, ahead)
        for m, t in zip(run.msgs, transfers):
            if m.kind is Kind.RECV_F:
                training = self.training
                self.slots[m.stage][m.mb].recv = tuple(_leaf(x, spec.requires_grad and training)
                                                       for x, spec in zip(t.tensors, t.specs))
            elif m.kind is Kind.RECV_B:
                self.slots[m.stage][m.mb].gout = t.tensors
        self.p2p.prune()
        if self.records is not None:
            self.records.extend((t.action, start, t.done, True) for t in transfers)

    def _transfer(self, m: Msg) -> Transfer:
        if m.kind is Kind.SEND_F:
            slot = self.slots[m.stage][m.mb]
            outs = slot.out
            if not self.training:
                slot.out = None
            shape_key, header = self.p2p.forward[m.key]
            return Transfer(m.action, True, m.peer, m.tag, list(outs), header=header, key=m.key, shape_key=shape_key)
        if m.kind is Kind.SEND_B:
            slot = self.slots[m.stage][m.mb]
            grads, slot.gin = slot.gin, None
            return Transfer(m.action, True, m.peer, m.tag, grads, key=m.key)
        return self._receive(m, required=True)

    def _receive(self, m: Msg, required: bool = False) -> Transfer | None:
        """The receive of ``m``; for an early receive (not ``required``), None when its shapes cannot be
        known yet (a gradient whose activation this rank has not computed)."""
        if m.kind is Kind.RECV_F:
            shape_key, header = self.p2p.forward[m.key]
            return Transfer(m.action, False, m.peer, m.tag, header=header, key=m.key, shape_key=shape_key)
        specs = self.gradient_specs(m.key)
        if specs is None and not required:
            return None
        return Transfer(m.action, False, m.peer, m.tag, specs=specs, key=m.key)

    def gradient_specs(self, key: tuple) -> list[TensorSpec] | None:
        """Shapes of the gradient message ``key`` = (False, sending stage, mb): our outputs needing grad
        (None while that forward has not run)."""
        _, sender, mb = key
        outs = self.slots[sender - 1][mb].out
        if outs is None:
            return None
        return [TensorSpec(tuple(o.shape), o.dtype) for o in outs if torch.is_tensor(o) and o.requires_grad]


def _accepts(module) -> frozenset | None:
    from .stage import _keyword_names

    return _keyword_names(module)


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
