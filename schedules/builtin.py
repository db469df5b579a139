# The built-in schedules: GPipe, 1F1B, interleaved 1F1B, zero-bubble H1/H2/V, PipeDream, 2BW, forward-only.
"""Built-in schedules, each a :class:`~pipeloom.schedules.registry.Schedule` that builds a compute plan.

Sizes as in docs/schedule-facts.md: ``p`` ranks, ``m`` microbatches, ``v`` chunks per rank, stage ``s``.
Plans hold compute actions (and weight-version actions for the PipeDream family); communication is
added by :func:`pipeloom.schedules.lowering.add_comm`.
"""

from __future__ import annotations

from .ir import Action, Kind, Plan
from .lowering import add_weight_versions
from .registry import Schedule, ScheduleError

Order = list[tuple[Kind, int]]  # (kind, microbatch) in a stage's execution order


def one_f_one_b_order(m: int, warmup: int) -> Order:
    """``warmup`` forwards, then alternate one forward and one backward, then drain the backwards."""
    warmup = min(warmup, m)
    order: Order = [(Kind.F, i) for i in range(warmup)]
    for i in range(m - warmup):
        order += [(Kind.F, warmup + i), (Kind.B, i)]
    order += [(Kind.B, i) for i in range(m - warmup, m)]
    return order


def _linear_plan(name: str, p: int, m: int, orders: list[Order], **meta) -> Plan:
    ranks = [[Action(s, kind, mb) for kind, mb in order] for s, order in enumerate(orders)]
    return Plan(ranks=ranks, stage_to_rank=list(range(p)), microbatches=m, name=name, meta=meta)


class GPipe(Schedule):
    """GPipe (Huang et al., arXiv 1811.06965): all forwards, then all backwards, then one flush.

    Every stage holds all ``m`` microbatches' activations at its peak. Bubble: beta = (p-1)/m,
    r = (p-1)/(m+p-1).
    """

    name = "gpipe"
    closed_form = "beta=(p-1)/m"

    def closed_form_beta(self, costs) -> float | None:
        return (self.pp - 1) / self.microbatches

    def build(self) -> Plan:
        m = self.microbatches
        order = [(Kind.F, i) for i in range(m)] + [(Kind.B, i) for i in range(m)]
        return _linear_plan(self.name, self.pp, m, [order] * self.pp)


class OneFOneB(Schedule):
    """1F1B = PipeDream-Flush (Narayanan et al., arXiv 2006.09503 §3.2).

    Stage s runs min(p-1-s, m) warm-up forwards, then one forward / one backward, then drains; one
    weight version and a flush per batch. Same bubble as GPipe, but stage s holds only min(p-s, m)
    microbatches' activations.
    """

    name = "1f1b"
    aliases = ("pipedream-flush",)
    closed_form = "beta=(p-1)/m"

    def closed_form_beta(self, costs) -> float | None:
        return (self.pp - 1) / self.microbatches

    def build(self) -> Plan:
        p, m = self.pp, self.microbatches
        return _linear_plan(self.name, p, m, [one_f_one_b_order(m, p - 1 - s) for s in range(p)])


class Interleaved1F1B(Schedule):
    """Interleaved 1F1B (Narayanan et al., arXiv 2104.04473 §2.2): v non-adjacent chunks per rank.

    Rank r holds stages r, r+p, ..., r+(v-1)p. Microbatches advance in groups of p through each
    chunk (Megatron's order), so ``microbatches`` must be a multiple of ``pp``. The bubble shrinks
    v-fold, beta = (p-1)/(v m), for v-fold more communication.
    """

    name = "interleaved-1f1b"
    aliases = ("interleaved",)
    default_vpp = 2
    closed_form = "beta=(p-1)/(v*m)"

    def check(self) -> None:
        if self.vpp < 2:
            raise ScheduleError(f"{self.name}: vpp={self.vpp}; interleaving needs vpp >= 2 (vpp=1 is 1f1b)")
        if self.microbatches % self.pp:
            raise ScheduleError(
                f"{self.name}: microbatches={self.microbatches} must be a multiple of pp={self.pp} "
                f"(Megatron's interleaved order advances microbatches in groups of pp)"
            )

    def closed_form_beta(self, costs) -> float | None:
        return (self.pp - 1) / (self.vpp * self.microbatches)

    def build(self) -> Plan:
        p, m, v = self.pp, self.microbatches, self.vpp
        total = m * v

        def chunk_and_mb(k: int, forward: bool) -> tuple[int, int]:
            chunk = (k // p) % v
            mb = (k // (p * v)) * p + k % p
            return (chunk if forward else v - 1 - chunk), mb

        ranks = []
        for r in range(p):
            warmup = min((p - r - 1) * 2 + (v - 1) * p, total)
            seq = [(Kind.F, k) for k in range(warmup)]
            for i in range(total - warmup):
                seq += [(Kind.F, warmup + i), (Kind.B, i)]
            seq += [(Kind.B, k) for k in range(total - warmup, total)]
            actions = []
            for kind, k in seq:
                chunk, mb = chunk_and_mb(k, kind is Kind.F)
                actions.append(Action(chunk * p + r, kind, mb))
            ranks.append(actions)
        return Plan(ranks=ranks, stage_to_rank=[s % p for s in range(p * v)], microbatches=m, name=self.name)


class ZeroBubbleH1(Schedule):
    """ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", arXiv 2401.10241 §3.1).

    The 1F1B order with the backward split into B (input gradient) and W (weight gradient); on stage s
    each W(j) runs right after B(j+s), the remaining Ws fill the tail. Bubble time (p-1)(F+B-W), with
    1F1B's peak activation memory.
    """

    name = "zb-h1"
    closed_form = "bubble time=(p-1)(F+B-W) when W<=F and m>=p"

    def closed_form_beta(self, costs) -> float | None:
        F, B, W = costs.F, costs.B, costs.W
        if W > F or self.microbatches < self.pp:  # each delayed W must fit the tail bubble it fills
            return None
        return (self.pp - 1) * (F + B - W) / (self.microbatches * (F + B + W))

    def build(self) -> Plan:
        p, m = self.pp, self.microbatches
        orders = []
        for s in range(p):
            order: Order = []
            next_w = 0
            for kind, mb in one_f_one_b_order(m, p - 1 - s):
                order.append((kind, mb))
                if kind is Kind.B and mb >= s:
                    order.append((Kind.W, next_w))
                    next_w += 1
            order += [(Kind.W, j) for j in range(next_w, m)]
            orders.append(order)
        return _linear_plan(self.name, p, m, orders)


class ZeroBubbleH2(Schedule):
    """ZB-H2 (Qi et al., arXiv 2401.10241 §3.1): more warm-up forwards buy a zero bubble.

    Stage s runs min(2(p-1-s)+1, m) warm-up forwards, then repeats [B; W if more than 2s Ws are pending
    or no forward is left; F if any remain], then the remaining Ws. Zero bubble when F=B=W and enough
    microbatches; stage 0 holds 2p-1 microbatches at its peak. Needs the optimizer step's global
    synchronisation removed (the paper's post-validation) to keep the bubble at zero across steps.
    """

    name = "zb-h2"
    closed_form = "zero bubble when F=B=W and m>=2p-1"

    def closed_form_beta(self, costs) -> float | None:
        equal = costs.F == costs.B == costs.W
        return 0.0 if equal and self.microbatches >= 2 * self.pp - 1 else None

    def build(self) -> Plan:
        p, m = self.pp, self.microbatches
        orders = []
        for s in range(p):
            warmup = min(2 * (p - 1 - s) + 1, m)
            order: Order = [(Kind.F, i) for i in range(warmup)]
            next_f, next_w = warmup, 0
            for b in range(m):
                order.append((Kind.B, b))
                pending = b + 1 - next_w
                if pending > 2 * s or next_f >= m:
                    order.append((Kind.W, next_w))
                    next_w += 1
                if next_f < m:
                    order.append((Kind.F, next_f))
                    next_f += 1
            order += [(Kind.W, j) for j in range(next_w, m)]
            orders.append(order)
        return _linear_plan(self.name, p, m, orders)


class ZeroBubbleV(Schedule):
    """ZB-V (Qi et al., arXiv 2401.10241 §6; Qi et al., arXiv 2405.15362): two chunks per rank in a V.

    Rank r holds chunks r and 2p-1-r, so the first and last chunks live on rank 0 and a microbatch
    turns around on rank p-1 without communication. The F/B order runs in phases - 2(p-1-r) forwards
    of chunk 0; r+1 pairs of forwards (chunk 0, chunk 1); p-1-r of (B chunk 1, F chunk 1); the steady
    (F0, B1, F1, B0); then the drain - and each W runs right after its B while forwards remain, and
    afterwards only when the next B must wait (W fills the drain's bubbles). Zero bubble when F=B=W and
    m >= 2p-1, holding 2p+1 chunk activations (p + 1/2 stages) at the peak. Fewer microbatches fall
    back to :func:`greedy_list_schedule`.
    """

    name = "zb-v"
    default_vpp = 2
    closed_form = "zero bubble when F=B=W and m>=2p-1"

    def closed_form_beta(self, costs) -> float | None:
        equal = costs.F == costs.B == costs.W
        return 0.0 if equal and self.microbatches >= 2 * self.pp - 1 else None

    def build(self) -> Plan:
        p, m = self.pp, self.microbatches
        stage_to_rank = [min(s, 2 * p - 1 - s) for s in range(2 * p)]
        if m < 2 * p - 1:
            ranks = greedy_list_schedule(stage_to_rank, m, split_backward=True, max_in_flight=2 * p + 1)
        else:
            ranks = fill_weight_gradients(stage_to_rank, m, [_zbv_forward_backward(p, m, r) for r in range(p)])
        return Plan(ranks=ranks, stage_to_rank=stage_to_rank, microbatches=m, name=self.name)


def _zbv_forward_backward(p: int, m: int, r: int) -> list[Action]:
    """Rank r's F/B order for ZB-V (chunk 0 = stage r, chunk 1 = stage 2p-1-r), m >= 2p-1."""
    c0, c1 = r, 2 * p - 1 - r
    F0, F1, B0, B1 = (Kind.F, c0), (Kind.F, c1), (Kind.B, c0), (Kind.B, c1)
    phases = (
        [F0] * (2 * (p - 1 - r))
        + [F0, F1] * (r + 1)
        + [B1, F1] * (p - 1 - r)
        + [F0, B1, F1, B0] * (m - 2 * p + r + 1)
        + [B1, F1, B0] * (p - 1 - r)
        + [B1, B0] * (r + 1)
        + [B0] * (p - 1 - r)
    )
    count: dict[tuple[Kind, int], int] = {}
    actions = []
    for kind, stage in phases:
        mb = count.get((kind, stage), 0)
        count[(kind, stage)] = mb + 1
        actions.append(Action(stage, kind, mb))
    return actions


def fill_weight_gradients(stage_to_rank: list[int], m: int, orders: list[list[Action]]) -> list[list[Action]]:
    """Insert a W for every B of ``orders`` (per-rank F/B orders), timed with unit-cost operations.

    While a rank still has forwards to run, each W follows its B at once (activation memory stays
    1F1B-like); after its last forward, a W runs only when the rank's next B is not ready, filling
    what would be a bubble. Remaining Ws run at the tail.
    """
    S, p = len(stage_to_rank), len(orders)
    done: dict[tuple[Kind, int, int], int] = {}
    ptr = [0] * p
    forwards_left = [sum(a.kind is Kind.F for a in order) for order in orders]
    pending: list[list[Action]] = [[] for _ in range(p)]
    out: list[list[Action]] = [[] for _ in range(p)]
    t, total = 0, sum(len(o) for o in orders) * 3 // 2

    def ready(a: Action) -> bool:
        s, mb = a.stage, a.microbatch
        if a.kind is Kind.F:
            return s == 0 or done.get((Kind.F, s - 1, mb), t + 1) <= t
        return done.get((Kind.F, s, mb), t + 1) <= t and (s == S - 1 or done.get((Kind.B, s + 1, mb), t + 1) <= t)

    while sum(len(o) for o in out) < total:
        started = []
        for r in range(p):
            nxt = orders[r][ptr[r]] if ptr[r] < len(orders[r]) else None
            can_run = nxt is not None and ready(nxt)
            if pending[r] and (forwards_left[r] > 0 or not can_run):
                started.append((r, pending[r].pop(0)))
            elif can_run:
                ptr[r] += 1
                forwards_left[r] -= nxt.kind is Kind.F
                if nxt.kind is Kind.B:
                    pending[r].append(Action(nxt.stage, Kind.W, nxt.microbatch))
                started.append((r, nxt))
        for r, a in started:
            done[(a.kind, a.stage, a.microbatch)] = t + 1
            out[r].append(a)
        t += 1
        if t > 4 * total + 4:
            raise RuntimeError("fill_weight_gradients made no progress: the F/B orders deadlock")
    return out


def greedy_list_schedule(
    stage_to_rank: list[int], m: int, split_backward: bool, max_in_flight: int
) -> list[list[Action]]:
    """Order compute actions by simulating unit-time chunk operations greedily.

    At each time step every idle rank picks, in priority order: a ready B (the critical path), a ready
    F while it holds fewer than ``max_in_flight`` chunk activations (the deepest stage first), a
    pending W. Ws left at the end run at the tail. Returns each rank's order.
    """
    S = len(stage_to_rank)
    p = max(stage_to_rank) + 1
    done: dict[tuple[Kind, int, int], int] = {}  # (kind, stage, mb) -> finish time
    next_f = [0] * S
    next_b = [0] * S
    pending_w: list[list[tuple[int, int]]] = [[] for _ in range(p)]
    in_flight = [0] * p
    orders: list[list[Action]] = [[] for _ in range(p)]
    t = 0
    total = S * m * (3 if split_backward else 2)
    while len(done) < total:
        started = []
        for r in range(p):
            stages = [s for s in range(S) if stage_to_rank[s] == r]
            choice = None
            for s in sorted(stages, reverse=True):  # B: deepest stage first
                mb = next_b[s]
                if (
                    mb < m
                    and done.get((Kind.F, s, mb), t + 1) <= t
                    and (s == S - 1 or done.get((Kind.B, s + 1, mb), t + 1) <= t)
                ):
                    choice = (Kind.B, s, mb)
                    break
            if choice is None and in_flight[r] < max_in_flight:
                for s in sorted(stages, reverse=True):
                    mb = next_f[s]
                    if mb < m and (s == 0 or done.get((Kind.F, s - 1, mb), t + 1) <= t):
                        choice = (Kind.F, s, mb)
                        break
            if choice is None and pending_w[r]:
                s, mb = pending_w[r].pop(0)
                choice = (Kind.W, s, mb)
            if choice is not None:
                started.append((r, choice))
        for r, (kind, s, mb) in started:
            done[(kind, s, mb)] = t + 1
            orders[r].append(Action(s, kind, mb))
            if kind is Kind.F:
                next_f[s] += 1
                in_flight[r] += 1
            elif kind is Kind.B:
                next_b[s] += 1
                if split_backward:
                    pending_w[r].append((s, mb))
                else:
                    in_flight[r] -= 1
            else:
                in_flight[r] -= 1
        t += 1
        if t > 10 * total + 10:
            raise RuntimeError("greedy_list_schedule made no progress; the stage mapping cannot be scheduled")
    return orders


class ForwardOnly(Schedule):
    """Forward only, for inference: every stage runs F for each microbatch in order, no backward.

    With ``vpp`` > 1 the stages are placed as interleaved 1F1B places them (rank r holds r, r+p, ...),
    so a model split for interleaved training runs inference unchanged; microbatches then advance in
    groups of p through each chunk (one microbatch at a time when m is not a multiple of p).
    """

    name = "forward-only"
    aliases = ("inference",)
    closed_form = "no bubble inside a rank's span (fill and drain fall outside it)"

    def check(self) -> None:
        pass

    def closed_form_beta(self, costs) -> float | None:
        if self.vpp > 1:
            return None
        return 0.0  # each rank is busy from its first forward to its last: no bubble inside its span

    def build(self) -> Plan:
        p, m, v = self.pp, self.microbatches, self.vpp
        if v == 1:
            order = [(Kind.F, i) for i in range(m)]
            return _linear_plan(self.name, p, m, [order] * p)
        if m % p == 0:
            visits = [((k // p) % v, (k // (p * v)) * p + k % p) for k in range(m * v)]  # (chunk, mb)
        else:
            visits = [(c, mb) for mb in range(m) for c in range(v)]
        ranks = [[Action(c * p + r, Kind.F, mb) for c, mb in visits] for r in range(p)]
        return Plan(ranks=ranks, stage_to_rank=[s % p for s in range(p * v)], microbatches=m, name=self.name)


class PipeDream(Schedule):
    """Asynchronous PipeDream with weight stashing (Narayanan et al., SOSP'19, arXiv 1806.03377 §3.4).

    No flush: each stage runs 1F1B continuously and applies an update after every backward. A
    microbatch's forward uses the newest weights the stage has and stashes that version for its own
    backward: microbatch b on stage s uses version max(0, b-(p-1-s)), and stage s holds p-s versions.
    With ``vertical_sync=True`` the version chosen at the input stage, max(0, b-p+1), travels with
    the microbatch and every stage uses it for forward and backward (BSP with delay p-1).
    """

    name = "pipedream"
    options = {"vertical_sync": False}

    def build(self) -> Plan:
        p, m = self.pp, self.microbatches
        plan = _linear_plan(self.name, p, m, [one_f_one_b_order(m, p - 1 - s) for s in range(p)])
        return add_weight_versions(plan, "vertical_sync" if self.opts["vertical_sync"] else "stash")


class PipeDream2BW(Schedule):
    """PipeDream-2BW (Narayanan et al., ICML'21, arXiv 2006.09503 §3.1): double-buffered weights.

    1F1B without flushes; a new weight version every ``update_every`` microbatches (default and
    minimum pp), its gradient coalesced over those microbatches. Microbatch b (0-based) uses version
    max(b // update_every - 1, 0) for forward and backward on every stage, so each stage holds at most
    two versions and W(t+1) = W(t) - lr * grad f(W(t-1)).
    """

    name = "pipedream-2bw"
    aliases = ("2bw",)
    options = {"update_every": None}

    def check(self) -> None:
        super().check()
        k = self.opts["update_every"] or self.pp
        if not isinstance(k, int) or k < self.pp:
            raise ScheduleError(f"{self.name}: update_every={k!r} must be an integer >= pp={self.pp}")
        if self.microbatches % k:
            raise ScheduleError(
                f"{self.name}: microbatches={self.microbatches} must be a multiple of "
                f"update_every={k} (each weight version covers update_every microbatches)"
            )
        self.opts["update_every"] = k

    def build(self) -> Plan:
        p, m = self.pp, self.microbatches
        plan = _linear_plan(self.name, p, m, [one_f_one_b_order(m, p - 1 - s) for s in range(p)])
        return add_weight_versions(plan, "2bw", update_every=self.opts["update_every"])
