# Plan validation: completeness, local order, communication matching, deadlock, weight versions.
"""``validate(plan)`` raises :class:`PlanError` whose message ends with the plan's grid, the failing
cell in brackets; it returns the plan unchanged when everything holds.

Checks, in order:
1. every action sits on the rank its stage maps to, with a microbatch in range, at most once;
2. counts are complete: one F and (unless forward-only) one B per stage and microbatch, at most one W;
3. on a rank, a microbatch's F precedes its B, which precedes its W;
4. with communication lowered: every cross-rank edge has its SEND after the producer and its RECV
   before the consumer, and no stray or duplicate transfers;
5. the plan runs to the end (no cycle of waits, no deadlock) - found by executing it with unit times;
6. weight versions: F, B and W of one microbatch on one stage use one version; with vertical sync or
   2BW every stage uses the same version for a microbatch; every version used is live at that point
   (created by an UPDATE, not yet dropped).
"""

from __future__ import annotations

from collections import Counter

from .ir import Action, Kind, Plan, PlanError


def _fail(plan: Plan, message: str, cell: tuple[int, int] | None = None) -> PlanError:
    where = f" (rank {cell[0]}, step {cell[1]})" if cell else ""
    return PlanError(f"plan {plan.name!r}: {message}{where}\n{plan.grid(mark=cell)}")


def validate(plan: Plan) -> Plan:
    """Check ``plan`` and return it; raise PlanError naming the first failing cell otherwise."""
    _check_placement(plan)
    _check_counts(plan)
    _check_local_order(plan)
    if plan.has_comm:
        _check_comm(plan)
    from .simulate import execute

    execute(plan, lambda a: 1.0 if a.kind.is_compute else 0.0)
    if plan.is_versioned:
        _check_versions(plan)
    return plan


def _check_placement(plan: Plan) -> None:
    seen: dict[tuple, tuple[int, int]] = {}
    for rank, actions in enumerate(plan.ranks):
        for step, a in enumerate(actions):
            if a.stage >= plan.num_stages:
                raise _fail(plan, f"{a} names stage {a.stage}, but the plan has {plan.num_stages} stages", (rank, step))
            if plan.rank_of(a.stage) != rank:
                raise _fail(
                    plan,
                    f"{a} is on rank {rank}, but stage {a.stage} lives on rank {plan.rank_of(a.stage)}",
                    (rank, step),
                )
            if a.microbatch is not None and a.microbatch >= plan.microbatches:
                raise _fail(
                    plan, f"{a} names microbatch {a.microbatch}; the plan has {plan.microbatches}", (rank, step)
                )
            if a.kind in (Kind.UPDATE, Kind.RELEASE):
                continue
            key = (a.stage, a.kind, a.microbatch)
            if a.kind is Kind.SYNC_TIED:
                key = (a.stage, a.kind, a.microbatch, step)
            if key in seen:
                raise _fail(plan, f"{a} appears twice (first at rank {seen[key][0]} step {seen[key][1]})", (rank, step))
            seen[key] = (rank, step)


def _check_counts(plan: Plan) -> None:
    counts = Counter((a.stage, a.kind, a.microbatch) for a in plan.actions() if a.kind.is_compute)
    forward_only = plan.is_forward_only
    for stage in range(plan.num_stages):
        rank = plan.rank_of(stage)
        end = (rank, len(plan.ranks[rank]))
        for mb in range(plan.microbatches):
            if counts[(stage, Kind.F, mb)] != 1:
                raise _fail(plan, f"stage {stage} has no forward of microbatch {mb} ({stage}F{mb} missing)", end)
            if not forward_only and counts[(stage, Kind.B, mb)] != 1:
                raise _fail(plan, f"stage {stage} has no backward of microbatch {mb} ({stage}B{mb} missing)", end)


def _check_local_order(plan: Plan) -> None:
    for rank, actions in enumerate(plan.ranks):
        position = {}
        for step, a in enumerate(actions):
            if not a.kind.is_compute:
                continue
            position[(a.stage, a.kind, a.microbatch)] = step
            before = {Kind.B: Kind.F, Kind.W: Kind.B}.get(a.kind)
            if before is not None and (a.stage, before, a.microbatch) not in position:
                raise _fail(
                    plan, f"{a} runs before {a.stage}{before.value}{a.microbatch} on the same stage", (rank, step)
                )


def _check_comm(plan: Plan) -> None:
    last = plan.num_stages - 1
    expected = set()
    for s in range(plan.num_stages):
        for mb in range(plan.microbatches):
            if s < last and plan.rank_of(s + 1) != plan.rank_of(s):
                expected |= {Action(s, Kind.SEND_F, mb), Action(s + 1, Kind.RECV_F, mb)}
                if not plan.is_forward_only:
                    expected |= {Action(s + 1, Kind.SEND_B, mb), Action(s, Kind.RECV_B, mb)}
    present = {}
    for rank, actions in enumerate(plan.ranks):
        for step, a in enumerate(actions):
            if a.kind.is_comm:
                if a not in expected:
                    raise _fail(
                        plan, f"{a} is not a transfer this plan needs (same rank, or no such edge)", (rank, step)
                    )
                present[a] = (rank, step)
    for a in sorted(expected - set(present), key=lambda x: (x.stage, x.microbatch, x.kind.value)):
        rank = plan.rank_of(a.stage)
        raise _fail(plan, f"the transfer {a} is missing", (rank, len(plan.ranks[rank])))
    producer = {Kind.SEND_F: Kind.F, Kind.SEND_B: Kind.B}
    consumer = {Kind.RECV_F: Kind.F, Kind.RECV_B: Kind.B}
    for rank, actions in enumerate(plan.ranks):
        index = {(a.stage, a.kind, a.microbatch): i for i, a in enumerate(actions)}
        for step, a in enumerate(actions):
            if a.kind in producer and index.get((a.stage, producer[a.kind], a.microbatch), step + 1) > step:
                raise _fail(
                    plan, f"{a} sends before {a.stage}{producer[a.kind].value}{a.microbatch} produced it", (rank, step)
                )
            if a.kind in consumer and index.get((a.stage, consumer[a.kind], a.microbatch), -1) < step:
                raise _fail(
                    plan,
                    f"{a} receives after its consumer {a.stage}{consumer[a.kind].value}{a.microbatch} ran",
                    (rank, step),
                )


def walk_versions(plan: Plan, rank: int):
    """Yield, after each action of ``rank``, the live weight versions per stage (raises on misuse)."""
    actions = plan.ranks[rank]
    released_later = [set() for _ in actions]  # (stage, version) released after position i
    pending: set = set()
    for i in range(len(actions) - 1, -1, -1):
        released_later[i] = set(pending)
        if actions[i].kind is Kind.RELEASE:
            pending.add((actions[i].stage, actions[i].version))
    live = {s: {0} for s in plan.stages_of(rank)}
    newest = {s: 0 for s in plan.stages_of(rank)}
    for step, a in enumerate(actions):
        s = a.stage
        if a.kind is Kind.UPDATE and a.version is not None:
            if a.version != newest[s] + 1:
                raise _fail(plan, f"{a} skips versions: stage {s}'s newest is {newest[s]}", (rank, step))
            if (s, newest[s]) not in released_later[step]:
                live[s].discard(newest[s])
            newest[s] = a.version
            live[s].add(a.version)
        elif a.kind is Kind.RELEASE:
            if a.version not in live[s] or a.version == newest[s]:
                raise _fail(
                    plan,
                    f"{a} drops version {a.version}, which is not a stashed version of stage {s} "
                    f"(live: {sorted(live[s])}, newest: {newest[s]})",
                    (rank, step),
                )
            live[s].discard(a.version)
        elif a.kind.is_compute and a.version is not None and a.version not in live[s]:
            raise _fail(
                plan,
                f"{a} uses weight version {a.version}, not held by stage {s} here (live: {sorted(live[s])})",
                (rank, step),
            )
        yield live


def _check_versions(plan: Plan) -> None:
    by_pair: dict[tuple[int, int], tuple[int, Action, tuple[int, int]]] = {}
    by_mb: dict[int, tuple[int, Action, tuple[int, int]]] = {}
    same_everywhere = plan.info.get("versioning") in ("vertical_sync", "2bw")
    for rank, actions in enumerate(plan.ranks):
        for step, a in enumerate(actions):
            if not a.kind.is_compute:
                continue
            if a.version is None:
                raise _fail(plan, f"{a} has no weight version in a versioned plan", (rank, step))
            first = by_pair.setdefault((a.stage, a.microbatch), (a.version, a, (rank, step)))
            if first[0] != a.version:
                raise _fail(
                    plan,
                    f"{a} uses version {a.version} but {first[1]} used {first[0]}: forward and backward "
                    f"of a microbatch must use one version",
                    (rank, step),
                )
            if same_everywhere:
                first = by_mb.setdefault(a.microbatch, (a.version, a, (rank, step)))
                if first[0] != a.version:
                    raise _fail(
                        plan,
                        f"{a} uses version {a.version} but {first[1]} used {first[0]}: with "
                        f"{plan.info['versioning']} every stage uses one version per microbatch",
                        (rank, step),
                    )
    for rank in range(plan.pp):
        for _ in walk_versions(plan, rank):
            pass
