# The plan IR: one Action per thing a rank does, and a Plan of per-rank action lists.
"""Actions and plans: the values every schedule, lowering pass, simulator and runtime share.

An :class:`Action` says *what* one rank does next: run the forward of model chunk (``stage``) 2 on
microbatch 0 (``2F0``), send that result on (``2SEND_F0``), apply an optimizer update that creates
weight version 3 (``2UPDATE@3``). A :class:`Plan` is one ordered list of actions per rank plus the
stage-to-rank mapping. Everything here is immutable, hashable, printable and serialisable, and imports
neither torch nor torch.distributed.

Text form (parses back with :meth:`Action.parse`)::

    2F0        stage 2, forward, microbatch 0
    2B0        stage 2, backward (input gradient only if the plan has a 2W0, full backward otherwise)
    2W0        stage 2, weight gradient of microbatch 0
    2F5@1      forward of microbatch 5 with weight version 1 (PipeDream family)
    1SEND_F0   stage 1 sends its forward output for microbatch 0 to stage 2
    2RECV_F0   stage 2 receives its forward input for microbatch 0 from stage 1
    2SEND_B0 / 1RECV_B0   the gradient travelling back from stage 2 to stage 1
    0UPDATE    optimizer step of stage 0; ``0UPDATE@3`` creates weight version 3
    0RELEASE@1 stage 0 drops its stashed weight version 1
    0SYNC_TIED gradients of tied parameters summed across the stages that share them
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence


class Kind(str, enum.Enum):
    """What an action does. The value is the text used in ``2F0``-style names."""

    F = "F"
    B = "B"
    W = "W"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"
    UPDATE = "UPDATE"
    RELEASE = "RELEASE"
    SYNC_TIED = "SYNC_TIED"

    @property
    def is_compute(self) -> bool:
        return self in (Kind.F, Kind.B, Kind.W)

    @property
    def is_comm(self) -> bool:
        return self in (Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B)

    @property
    def needs_microbatch(self) -> bool:
        return self.is_compute or self.is_comm


_KIND_ALTERNATIVES = "|".join(sorted((k.value for k in Kind), key=len, reverse=True))
_ACTION_RE = re.compile(rf"^(\d+)({_KIND_ALTERNATIVES})(\d+)?(?:@(\d+))?$")


class PlanError(ValueError):
    """A plan is malformed, incomplete or would deadlock; the message shows the grid and the cell."""


@dataclass(frozen=True, order=True)
class Action:
    """One step on one rank: ``stage`` (model chunk index), ``kind``, ``microbatch`` and ``version``."""

    stage: int
    kind: Kind
    microbatch: int | None = None
    version: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, Kind):
            object.__setattr__(self, "kind", Kind(self.kind))
        if self.stage < 0:
            raise ValueError(f"Action stage must be >= 0, got {self.stage}")
        if self.kind.needs_microbatch and self.microbatch is None:
            raise ValueError(f"{self.kind.value} needs a microbatch index (stage {self.stage})")
        if self.microbatch is not None and self.microbatch < 0:
            raise ValueError(f"microbatch must be >= 0, got {self.microbatch}")
        if self.kind is Kind.RELEASE and self.version is None:
            raise ValueError(f"RELEASE on stage {self.stage} needs the version it drops")

    def __str__(self) -> str:
        text = f"{self.stage}{self.kind.value}"
        if self.microbatch is not None:
            text += str(self.microbatch)
        if self.version is not None:
            text += f"@{self.version}"
        return text

    __repr__ = __str__

    @classmethod
    def parse(cls, text: str) -> "Action":
        """Parse ``"2F0"``, ``"2F5@1"``, ``"0UPDATE@3"``... back into an Action."""
        match = _ACTION_RE.match(text.strip())
        if match is None:
            raise ValueError(
                f"cannot parse action {text!r}: expected <stage><kind>[<microbatch>][@<version>], "
                f"e.g. '2F0', with kind one of {[k.value for k in Kind]}"
            )
        stage, kind, mb, version = match.groups()
        return cls(int(stage), Kind(kind), None if mb is None else int(mb), None if version is None else int(version))

    def with_version(self, version: int | None) -> "Action":
        return Action(self.stage, self.kind, self.microbatch, version)


def F(stage: int, mb: int, version: int | None = None) -> Action:
    """Shorthand for a forward action."""
    return Action(stage, Kind.F, mb, version)


def B(stage: int, mb: int, version: int | None = None) -> Action:
    """Shorthand for a backward action (input gradient when the plan has the matching W)."""
    return Action(stage, Kind.B, mb, version)


def W(stage: int, mb: int, version: int | None = None) -> Action:
    """Shorthand for a weight-gradient action."""
    return Action(stage, Kind.W, mb, version)


@dataclass(frozen=True)
class Plan:
    """Per-rank ordered action lists plus the stage-to-rank mapping.

    ``ranks[r]`` is the ordered tuple of actions rank ``r`` executes; ``stage_to_rank[s]`` is the rank
    holding model chunk ``s``. ``meta`` carries schedule facts as sorted (key, value) pairs (for example
    ``("versioning", "stash")``), so a Plan stays hashable and comparable.
    """

    ranks: tuple[tuple[Action, ...], ...]
    stage_to_rank: tuple[int, ...]
    microbatches: int
    name: str = "custom"
    meta: tuple[tuple[str, object], ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", tuple(tuple(actions) for actions in self.ranks))
        object.__setattr__(self, "stage_to_rank", tuple(self.stage_to_rank))
        if isinstance(self.meta, Mapping):
            object.__setattr__(self, "meta", tuple(sorted(self.meta.items())))
        if not self.ranks:
            raise PlanError("a plan needs at least one rank")
        if self.microbatches < 1:
            raise PlanError(f"a plan needs at least one microbatch, got microbatches={self.microbatches}")
        for stage, rank in enumerate(self.stage_to_rank):
            if not 0 <= rank < len(self.ranks):
                raise PlanError(f"stage {stage} is mapped to rank {rank}, but the plan has {len(self.ranks)} ranks")

    # ----- shape -------------------------------------------------------------------------------
    @property
    def pp(self) -> int:
        """Number of pipeline ranks."""
        return len(self.ranks)

    @property
    def num_stages(self) -> int:
        """Number of model chunks (``pp * vpp`` for interleaved plans)."""
        return len(self.stage_to_rank)

    @property
    def vpp(self) -> int:
        """Model chunks per rank (the largest count, for uneven mappings)."""
        return max(self.stage_to_rank.count(r) for r in range(self.pp))

    def rank_of(self, stage: int) -> int:
        if not 0 <= stage < self.num_stages:
            raise PlanError(f"stage {stage} is outside this plan's {self.num_stages} stages")
        return self.stage_to_rank[stage]

    def stages_of(self, rank: int) -> tuple[int, ...]:
        return tuple(s for s, r in enumerate(self.stage_to_rank) if r == rank)

    @property
    def info(self) -> dict:
        return dict(self.meta)

    # Facts read from every action, computed once per plan (a Plan is immutable) and kept out of the
    # dataclass fields, so they change neither equality nor hashing nor serialisation.
    def _fact(self, name: str, compute) -> object:
        cached = self.__dict__.get(name)
        if cached is None:
            cached = compute()
            object.__setattr__(self, name, cached)
        return cached

    @property
    def is_forward_only(self) -> bool:
        """No backward anywhere (an inference plan)."""
        return self._fact("_forward_only", lambda: not any(a.kind is Kind.B for a in self.actions()))

    @property
    def is_versioned(self) -> bool:
        """Some action carries a weight version (PipeDream, 2BW)."""
        return self._fact("_versioned", lambda: any(a.version is not None for a in self.actions()))

    @property
    def has_comm(self) -> bool:
        """The plan has been lowered with sends and receives."""
        return self._fact("_has_comm", lambda: any(a.kind.is_comm for a in self.actions()))

    def actions(self) -> Iterator[Action]:
        for actions in self.ranks:
            yield from actions

    def splits_backward(self, stage: int, microbatch: int) -> bool:
        """True when (stage, microbatch) has a separate W: then its B computes input gradients only."""
        return (stage, microbatch) in self._split_pairs

    @property
    def _split_pairs(self) -> frozenset:
        return self._fact("_split_cache",
                          lambda: frozenset((a.stage, a.microbatch) for a in self.actions() if a.kind is Kind.W))

    def weight_version(self, stage: int, microbatch: int) -> int:
        """The weight version microbatch ``microbatch`` uses on ``stage`` (versioned plans only)."""
        for action in self.ranks[self.rank_of(stage)]:
            if action.kind is Kind.F and action.stage == stage and action.microbatch == microbatch:
                if action.version is None:
                    raise PlanError(f"plan {self.name!r} is not weight-versioned: {action} has no version")
                return action.version
        raise PlanError(f"plan {self.name!r} has no forward of microbatch {microbatch} on stage {stage}")

    def compute_only(self) -> "Plan":
        """The same plan without communication actions."""
        return self.replace(ranks=[[a for a in actions if not a.kind.is_comm] for actions in self.ranks])

    def replace(self, **changes) -> "Plan":
        fields = dict(
            ranks=self.ranks,
            stage_to_rank=self.stage_to_rank,
            microbatches=self.microbatches,
            name=self.name,
            meta=self.meta,
        )
        fields.update(changes)
        return Plan(**fields)

    # ----- printing ----------------------------------------------------------------------------
    def grid(self, mark: tuple[int, int] | None = None, compute_only: bool = False) -> str:
        """The plan as a rank-by-step table; ``mark=(rank, step)`` brackets one cell."""
        rows = [[a for a in actions if not (compute_only and not a.kind.is_compute)] for actions in self.ranks]
        steps = max((len(r) for r in rows), default=0)
        width = max([len(str(a)) for r in rows for a in r] + [4]) + 2
        header = "step    " + "".join(f"{i:<{width}}" for i in range(steps))
        lines = [header.rstrip()]
        for rank, row in enumerate(rows):
            cells = []
            for step, action in enumerate(row):
                text = str(action)
                if mark == (rank, step):
                    text = f"[{text}]"
                cells.append(f"{text:<{width}}")
            if mark is not None and mark[0] == rank and mark[1] >= len(row):
                cells.append("[ ]")
            lines.append((f"rank {rank:<3}" + "".join(cells)).rstrip())
        return "\n".join(lines)

    def __str__(self) -> str:
        return (
            f"Plan {self.name!r}: pp={self.pp}, stages={self.num_stages}, microbatches={self.microbatches}\n"
            + self.grid()
        )

    def find(self, action: Action) -> tuple[int, int]:
        """(rank, step) of ``action`` in the plan; raises PlanError when absent."""
        for rank, actions in enumerate(self.ranks):
            for step, a in enumerate(actions):
                if a == action:
                    return rank, step
        raise PlanError(f"{action} is not in plan {self.name!r}")

    # ----- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "microbatches": self.microbatches,
            "stage_to_rank": list(self.stage_to_rank),
            "meta": {k: v for k, v in self.meta},
            "ranks": [[str(a) for a in actions] for actions in self.ranks],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "Plan":
        try:
            ranks = [[Action.parse(text) for text in actions] for actions in data["ranks"]]
            return cls(
                ranks=ranks,
                stage_to_rank=data["stage_to_rank"],
                microbatches=int(data["microbatches"]),
                name=data.get("name", "custom"),
                meta=dict(data.get("meta", {})),
            )
        except KeyError as missing:
            raise PlanError(f"plan JSON lacks the key {missing}; it needs ranks, stage_to_rank, microbatches") from None

    def to_json(self, path: str | None = None) -> str:
        import json

        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str) -> "Plan":
        """Read a plan from a JSON string or a path to a JSON file."""
        import json
        import os

        text = text_or_path
        if not text_or_path.lstrip().startswith("{") and os.path.exists(text_or_path):
            with open(text_or_path) as f:
                text = f.read()
        return cls.from_dict(json.loads(text))

    def to_csv(self, path: str | None = None) -> str:
        """pipeloom CSV: a header row of plan facts, then one row of actions per rank."""
        import csv
        import io
        import json

        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(
            [
                "#pipeloom",
                self.name,
                self.microbatches,
                " ".join(map(str, self.stage_to_rank)),
                json.dumps({k: v for k, v in self.meta}),
            ]
        )
        for actions in self.ranks:
            writer.writerow([str(a) for a in actions])
        return _maybe_write(buf.getvalue(), path)

    @classmethod
    def from_csv(cls, text_or_path: str) -> "Plan":
        """Read pipeloom CSV, or PyTorch's compute-only CSV (detected by the missing header row)."""
        import csv
        import io
        import json

        text = _maybe_read(text_or_path)
        rows = list(csv.reader(io.StringIO(text)))
        if not rows or rows[0][:1] != ["#pipeloom"]:
            return from_torch_csv(text)
        _, name, microbatches, stage_to_rank, meta = rows[0]
        ranks = [[Action.parse(c) for c in row if c.strip()] for row in rows[1:]]
        return cls(
            ranks=ranks,
            stage_to_rank=[int(x) for x in stage_to_rank.split()],
            microbatches=int(microbatches),
            name=name,
            meta=json.loads(meta),
        )

    def to_torch_csv(self, path: str | None = None) -> str:
        """PyTorch ``torch.distributed.pipelining`` compute-only CSV (its ``_load_csv`` reads it).

        PyTorch names a full backward ``B`` and an input-only backward ``I``; weight versions and
        pipeloom-only actions (UPDATE, RELEASE, SYNC_TIED) have no PyTorch form and are dropped.
        """
        import csv
        import io

        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        for actions in self.ranks:
            row = []
            for a in actions:
                if not a.kind.is_compute:
                    continue
                kind = a.kind.value
                if a.kind is Kind.B and self.splits_backward(a.stage, a.microbatch):
                    kind = "I"
                row.append(f"{a.stage}{kind}{a.microbatch}")
            writer.writerow(row)
        return _maybe_write(buf.getvalue(), path)


def from_torch_csv(text_or_path: str, microbatches: int | None = None, name: str = "torch-csv") -> Plan:
    """Read PyTorch's compute-only CSV (rows = ranks; cells like ``0F1``, ``1I0``, ``1W0``, ``2B3``).

    ``I`` (input-gradient backward) becomes our ``B`` with its ``W`` kept; PyTorch's full ``B`` stays a full
    backward. The stage-to-rank mapping is inferred from where each stage's actions appear.
    """
    import csv
    import io

    torch_re = re.compile(r"^(\d+)(F|I|B|W)(\d+)$")
    ranks: list[list[Action]] = []
    for row_no, row in enumerate(csv.reader(io.StringIO(_maybe_read(text_or_path)))):
        actions = []
        for cell in row:
            cell = cell.strip()
            if not cell or cell == "None":
                continue
            match = torch_re.match(cell)
            if match is None:
                raise PlanError(f"row {row_no} cell {cell!r}: not a compute-only PyTorch action (F, I, B, W)")
            stage, kind, mb = match.groups()
            actions.append(Action(int(stage), Kind.B if kind in ("I", "B") else Kind(kind), int(mb)))
        ranks.append(actions)
    stage_to_rank: dict[int, int] = {}
    for rank, actions in enumerate(ranks):
        for a in actions:
            if stage_to_rank.setdefault(a.stage, rank) != rank:
                raise PlanError(f"stage {a.stage} appears on ranks {stage_to_rank[a.stage]} and {rank}")
    if sorted(stage_to_rank) != list(range(len(stage_to_rank))):
        raise PlanError(f"stages {sorted(stage_to_rank)} are not 0..{len(stage_to_rank) - 1}")
    mbs = 1 + max((a.microbatch for acts in ranks for a in acts), default=0)
    return Plan(
        ranks=ranks,
        stage_to_rank=[stage_to_rank[s] for s in range(len(stage_to_rank))],
        microbatches=microbatches or mbs,
        name=name,
    )


def _maybe_read(text_or_path: str) -> str:
    import os

    if "\n" not in text_or_path and "," not in text_or_path and os.path.exists(text_or_path):
        with open(text_or_path) as f:
            return f.read()
    return text_or_path


def _maybe_write(text: str, path: str | None) -> str:
    if path is not None:
        with open(path, "w") as f:
            f.write(text)
    return text


def plan_from_lists(
    ranks: Sequence[Iterable[str | Action]],
    stage_to_rank: Sequence[int] | None = None,
    microbatches: int | None = None,
    name: str = "custom",
    **meta,
) -> Plan:
    """Build a plan from action texts, e.g. ``plan_from_lists([["0F0", "0B0"], ["1F0", "1B0"]])``."""
    parsed = [[a if isinstance(a, Action) else Action.parse(a) for a in actions] for actions in ranks]
    if stage_to_rank is None:
        stage_to_rank = list(range(len(parsed)))
    if microbatches is None:
        microbatches = 1 + max((a.microbatch for acts in parsed for a in acts if a.microbatch is not None), default=0)
    return Plan(ranks=parsed, stage_to_rank=stage_to_rank, microbatches=microbatches, name=name, meta=meta)
