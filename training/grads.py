# Data-parallel gradient reduction of a training step: after backward, or overlapped with it (parallel.dp_overlap).
"""What the loop calls to sum this replica's gradient shares over the dp group (see :mod:`.steps` for why a
sum): :class:`GradReducer`.

* ``overlap=False``: :func:`~pipeloom.parallel.data_parallel.allreduce_gradients` after the step, in flat
  buckets of ``bucket_mb`` MiB.
* ``overlap=True``: a :class:`~pipeloom.parallel.data_parallel.GradSync` over the same buckets. The steppers
  enter :meth:`GradReducer.around` for every compute action; the last action of the step that produces a
  stage's weight gradients (its last B, or its last W when the plan splits backward) runs with the gradient
  hooks live, so each bucket's asynchronous all-reduce is launched during that backward as soon as its
  gradients are final (as DDP does; arXiv 2006.15704 §3.2-3.3), and the rest of the rank's work - other
  stages' backwards, pipeline sends and receives - runs while it is in flight. After the action, the
  stage's parameters are marked final (weight gradients a W accumulates by hand fire no hook). Every other
  backward accumulates locally. :meth:`finish` waits for the buckets and writes the sums back.
  Parameters tied across pipeline stages are left out of the overlap: the runtime adds the other stage's
  gradient into them after their backward (SYNC_TIED), so they are summed over dp in :meth:`finish`.

Either way the loop sees the same ``.grad`` afterwards (up to the order of float additions, which bucket
boundaries can change).
"""

from __future__ import annotations

import contextlib

from pipeloom.schedules.ir import Kind


def final_gradient_actions(actions) -> dict[int, tuple]:
    """``{stage: (kind, microbatch)}``: the last B or W of each stage among ``actions`` (one rank's plan, in
    order)."""
    last = {}
    for a in actions:
        if a.kind in (Kind.B, Kind.W):
            last[a.stage] = (a.kind, a.microbatch)
    return last


class GradReducer:
    """Sums the gradients of ``parts`` over ``dp_group`` once per step (see the module docstring).

    ``dp_group`` None (one replica) makes every call a no-op. ``actions``: this rank's actions of the plan
    (``plan.ranks[pp rank]``), to find each stage's last gradient-producing action.
    """

    def __init__(self, parts, dp_group, actions, *, overlap: bool = False, bucket_mb: float = 25.0):
        from pipeloom.parallel.data_parallel import GradSync

        self.parts, self.dp_group, self.bucket_mb = parts, dp_group, bucket_mb
        self.params = [s.param for s in parts.specs]
        self.launched_before_finish = 0  # buckets the last step launched before finish (overlap only)
        self.overlap = overlap and dp_group is not None
        self.sync = None
        if not self.overlap:
            return
        tied = {id(p) for p in _tied_params(parts)}
        self.tied = [p for p in self.params if id(p) in tied]
        self.sync = GradSync([p for p in self.params if id(p) not in tied], dp_group, bucket_mb=bucket_mb, op="sum")
        self.last = final_gradient_actions(actions)
        self.stage_params = {s: list(m.parameters()) for s, m in parts.modules.items()}

    @contextlib.contextmanager
    def around(self, action):
        """Entered by the steppers around every compute action of a step."""
        if self.sync is None:
            yield
            return
        if self.last.get(action.stage) != (action.kind, action.microbatch):
            with self.sync.no_sync():
                yield
            return
        with self.sync.synced():
            yield
        self.sync.mark_ready(self.stage_params[action.stage])

    def finish(self) -> None:
        """After the step: every gradient summed over the dp group (collective over it)."""
        if self.dp_group is None:
            return
        from pipeloom.parallel.data_parallel import allreduce_gradients

        if self.sync is None:
            allreduce_gradients(self.params, self.dp_group, bucket_mb=self.bucket_mb, op="sum")
            return
        self.launched_before_finish = self.sync.launched_during_backward
        self.sync.finish()
        if self.tied:
            allreduce_gradients(self.tied, self.dp_group, bucket_mb=self.bucket_mb, op="sum")


def _tied_params(parts) -> list:
    """This rank's parameters that the pipeline runtime ties to another stage's (``parts.tied``)."""
    out = []
    for group in parts.tied:
        for stage, name in group.items():
            if stage in parts.modules:
                out.append(parts.modules[stage].get_parameter(name))
    return out
