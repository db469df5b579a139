# Lowering passes: pure functions from plan to plan (communication, backward split, weight versions).
"""Each pass takes a :class:`Plan` and returns a new one; none runs a model.

* :func:`add_comm` - insert ``SEND_F``/``RECV_F``/``SEND_B``/``RECV_B`` on every cross-rank edge.
* :func:`split_backward` / :func:`merge_backward` - give every backward its own ``W``, or fold them back.
* :func:`add_weight_versions` - annotate versions and insert ``UPDATE``/``RELEASE`` (PipeDream family).
* :func:`add_optimizer_step` - one ``UPDATE`` per stage at the end of each rank (synchronous plans).
* :func:`add_tied_sync` - a ``SYNC_TIED`` before the update on every stage sharing tied parameters.
* :func:`lower` - what the runtime executes: the above in order.

Weight-version semantics (PipeDream arXiv 1806.03377 §3.4, PipeDream-2BW arXiv 2006.09503 §3.1; the rules
are collected in docs/schedule-facts.md). Every stage starts with version 0. ``UPDATE@v`` applies
the accumulated gradients to the newest weights (version v-1) and creates version v; version v-1 stays
(is *stashed*) only if a later ``RELEASE@(v-1)`` on that stage says it is still needed, otherwise it
is replaced in place. ``RELEASE@v`` drops a stashed version after its last use.
"""

from __future__ import annotations

from .ir import Action, Kind, Plan, PlanError


def add_comm(plan: Plan) -> Plan:
    """Insert sends right after the producing compute and receives right before the consuming one.

    Stages on the same rank pass tensors locally (no action). Sends are non-blocking; a receive
    blocks until the matching send was posted. Idempotent: a plan with communication is returned as is.
    """
    if plan.has_comm:
        return plan
    last = plan.num_stages - 1
    ranks = []
    for rank, actions in enumerate(plan.ranks):
        out: list[Action] = []
        for a in actions:
            s, mb = a.stage, a.microbatch
            if a.kind is Kind.F and s > 0 and plan.rank_of(s - 1) != rank:
                out.append(Action(s, Kind.RECV_F, mb))
            if a.kind is Kind.B and s < last and plan.rank_of(s + 1) != rank:
                out.append(Action(s, Kind.RECV_B, mb))
            out.append(a)
            if a.kind is Kind.F and s < last and plan.rank_of(s + 1) != rank:
                out.append(Action(s, Kind.SEND_F, mb))
            if a.kind is Kind.B and s > 0 and plan.rank_of(s - 1) != rank:
                out.append(Action(s, Kind.SEND_B, mb))
        ranks.append(out)
    return plan.replace(ranks=ranks)


def split_backward(plan: Plan) -> Plan:
    """Give every full backward a ``W`` right after it (B then computes input gradients only)."""
    ranks = []
    for actions in plan.ranks:
        out = []
        for a in actions:
            out.append(a)
            if a.kind is Kind.B and not plan.splits_backward(a.stage, a.microbatch):
                out.append(Action(a.stage, Kind.W, a.microbatch, a.version))
        ranks.append(out)
    return plan.replace(ranks=ranks)


def merge_backward(plan: Plan) -> Plan:
    """Drop every ``W``: each B becomes a full backward (input and weight gradients at once)."""
    return plan.replace(ranks=[[a for a in actions if a.kind is not Kind.W] for actions in plan.ranks])


def add_optimizer_step(plan: Plan) -> Plan:
    """Append one ``UPDATE`` per stage at the end of each rank (a synchronous plan's flush and step)."""
    if any(a.kind is Kind.UPDATE for a in plan.actions()):
        return plan
    return plan.replace(
        ranks=[
            list(actions) + [Action(s, Kind.UPDATE) for s in plan.stages_of(rank)]
            for rank, actions in enumerate(plan.ranks)
        ]
    )


def add_tied_sync(plan: Plan, tied_stages: tuple[int, ...]) -> Plan:
    """Insert ``SYNC_TIED`` on each stage in ``tied_stages`` before each of its ``UPDATE`` actions.

    The runtime sums the tied parameters' gradients over the ranks holding those stages there (a
    collective among them), so the copies stay identical after the update.
    """
    tied = set(tied_stages)
    bad = sorted(s for s in tied if not 0 <= s < plan.num_stages)
    if bad:
        raise PlanError(f"tied stages {bad} are outside the plan's {plan.num_stages} stages")
    if len(tied) < 2 or any(a.kind is Kind.SYNC_TIED for a in plan.actions()):
        return plan
    ranks = []
    for actions in plan.ranks:
        out = []
        for a in actions:
            if a.kind is Kind.UPDATE and a.stage in tied:
                out.append(Action(a.stage, Kind.SYNC_TIED))
            out.append(a)
        ranks.append(out)
    return plan.replace(ranks=ranks)


def lower(plan: Plan, tied_stages: tuple[int, ...] = ()) -> Plan:
    """The plan the runtime executes: optimizer step (synchronous plans), tied sync, communication."""
    if not plan.is_versioned and not plan.is_forward_only:
        plan = add_optimizer_step(plan)
    if tied_stages and not plan.is_forward_only:
        plan = add_tied_sync(plan, tuple(tied_stages))
    return add_comm(plan)


def add_weight_versions(plan: Plan, policy: str, update_every: int = 1) -> Plan:
    """Annotate each F/B/W with the weight version it uses and insert UPDATE and RELEASE actions.

    ``policy``:
      * ``"stash"`` - PipeDream weight stashing: a forward uses the stage's newest version, its
        backward the same; an update after every microbatch's last backward action.
      * ``"vertical_sync"`` - the version the input stage (stage 0) used travels with the microbatch;
        every stage uses it; an update after every microbatch.
      * ``"2bw"`` - PipeDream-2BW: microbatch b uses version max(b // update_every - 1, 0) everywhere;
        an update after the last backward of every group of ``update_every`` microbatches.
    """
    if policy not in ("stash", "vertical_sync", "2bw"):
        raise PlanError(f"unknown versioning policy {policy!r}; valid: stash, vertical_sync, 2bw")
    if plan.is_versioned:
        raise PlanError(f"plan {plan.name!r} already carries weight versions")
    group = update_every if policy == "2bw" else 1
    last_backward = {}  # (stage, mb) -> the kind of its last backward action
    for a in plan.actions():
        if a.kind is Kind.W or (a.kind is Kind.B and (a.stage, a.microbatch) not in last_backward):
            last_backward[(a.stage, a.microbatch)] = a.kind

    def input_stage_versions() -> dict[int, int]:
        """Version the input stage uses for each microbatch: its newest when the forward runs."""
        newest, versions, done = 0, {}, 0
        for a in plan.ranks[plan.rank_of(0)]:
            if a.stage != 0:
                continue
            if a.kind is Kind.F:
                versions[a.microbatch] = newest
            elif a.kind is last_backward.get((0, a.microbatch)):
                done += 1
                if done % group == 0:
                    newest += 1
        return versions

    travelling = input_stage_versions() if policy == "vertical_sync" else {}
    ranks = []
    for actions in plan.ranks:
        newest: dict[int, int] = {}
        finished: dict[int, int] = {}
        used: dict[tuple[int, int], int] = {}
        out: list[Action] = []
        for a in actions:
            s, mb = a.stage, a.microbatch
            if not a.kind.is_compute:
                out.append(a)
                continue
            if a.kind is Kind.F:
                if policy == "stash":
                    used[(s, mb)] = newest.get(s, 0)
                elif policy == "vertical_sync":
                    used[(s, mb)] = travelling[mb]
                else:
                    used[(s, mb)] = max(mb // group - 1, 0)
            if (s, mb) not in used:
                raise PlanError(f"{a} runs before the forward of microbatch {mb} on stage {s}")
            out.append(a.with_version(used[(s, mb)]))
            if a.kind is last_backward.get((s, mb)):
                finished[s] = finished.get(s, 0) + 1
                if finished[s] % group == 0:
                    newest[s] = newest.get(s, 0) + 1
                    out.append(Action(s, Kind.UPDATE, version=newest[s]))
        ranks.append(_insert_releases(out))
    meta = dict(plan.meta)
    meta.update(versioning=policy, update_every=group)
    return plan.replace(ranks=ranks, meta=meta)


def _insert_releases(actions: list[Action]) -> list[Action]:
    """Add RELEASE@v after the last use of every version that an UPDATE superseded before that use."""
    last_use: dict[tuple[int, int], int] = {}
    superseded_at: dict[tuple[int, int], int] = {}
    for i, a in enumerate(actions):
        if a.kind.is_compute and a.version is not None:
            last_use[(a.stage, a.version)] = i
        if a.kind is Kind.UPDATE and a.version is not None:
            superseded_at[(a.stage, a.version - 1)] = i
    releases: dict[int, list[Action]] = {}
    for key, i in superseded_at.items():
        if last_use.get(key, -1) > i:
            releases.setdefault(last_use[key], []).append(Action(key[0], Kind.RELEASE, version=key[1]))
    out = []
    for i, a in enumerate(actions):
        out.append(a)
        out.extend(releases.get(i, ()))
    return out
