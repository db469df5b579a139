# Plans as data: actions and plans round-trip through text, JSON and CSV, and every schedule validates.
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeloom.schedules import (
    Action,
    Costs,
    Kind,
    Plan,
    Schedule,
    ScheduleError,
    add_comm,
    from_torch_csv,
    get_schedule,
    list_schedules,
    lower,
    merge_backward,
    plan_from_lists,
    register_schedule,
    simulate,
    split_backward,
    validate,
)

SYNC = ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v"]
ALL = SYNC + ["pipedream", "pipedream-2bw", "forward-only"]


@pytest.mark.parametrize(
    "text",
    [
        "2F0",
        "0B13",
        "5W2",
        "1SEND_F0",
        "2RECV_F0",
        "2SEND_B7",
        "1RECV_B7",
        "0UPDATE",
        "3UPDATE@4",
        "0RELEASE@1",
        "2F5@1",
        "0SYNC_TIED",
    ],
)
def test_action_text_round_trip(text):
    assert str(Action.parse(text)) == text


def test_action_fields_and_errors():
    a = Action.parse("2F5@1")
    assert (a.stage, a.kind, a.microbatch, a.version) == (2, Kind.F, 5, 1)
    with pytest.raises(ValueError, match="cannot parse action 'X9'"):
        Action.parse("X9")
    with pytest.raises(ValueError, match="needs a microbatch"):
        Action(0, Kind.F)
    with pytest.raises(ValueError, match="RELEASE on stage 1 needs the version"):
        Action(1, Kind.RELEASE)


def test_names_and_aliases():
    assert set(ALL) <= set(list_schedules())
    assert (
        get_schedule("pipedream-flush", pp=4, microbatches=8).ranks == get_schedule("1f1b", pp=4, microbatches=8).ranks
    )


@pytest.mark.parametrize("name", ALL)
def test_json_and_csv_round_trip(name, tmp_path):
    plan = get_schedule(name, pp=3, microbatches=6)
    for p in (plan, lower(plan)):
        assert Plan.from_json(p.to_json()) == p
        assert Plan.from_csv(p.to_csv()) == p
        path = tmp_path / "plan.json"
        p.to_json(str(path))
        assert Plan.from_json(str(path)) == p
    assert json.loads(plan.to_json())["ranks"][0][0].startswith("0F0")


@pytest.mark.parametrize("name", SYNC)
def test_torch_csv_round_trip(name):
    plan = get_schedule(name, pp=4, microbatches=8)
    back = from_torch_csv(plan.to_torch_csv(), name=plan.name)
    assert back.ranks == plan.ranks and back.stage_to_rank == plan.stage_to_rank


def test_torch_csv_uses_I_for_split_backward():
    text = get_schedule("zb-h1", pp=2, microbatches=2).to_torch_csv()
    assert "1I0" in text and "1W0" in text and "B" not in text
    assert "1B0" in get_schedule("1f1b", pp=2, microbatches=2).to_torch_csv()


# PyTorch's own schedule generators and validator, driven with stand-in stages (no process group).
class _MockStage:
    def __init__(self, stage_index, num_stages, group_size, group_rank):
        import torch

        self.stage_index, self.num_stages = stage_index, num_stages
        self.group_size, self.group_rank = group_size, group_rank
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.submod = torch.nn.Linear(1, 1)
        self.stage_index_to_group_rank = {}
        self.has_backward = True


def _torch_pipeline_order(cls_name, pp, m):
    from torch.distributed.pipelining import schedules as S

    cls = getattr(S, cls_name)
    stage_ids = [0, 2 * pp - 1] if cls_name == "ScheduleZBVZeroBubble" else [0, pp]
    return cls([_MockStage(s, 2 * pp, pp, 0) for s in stage_ids], m).pipeline_order


@pytest.mark.parametrize(
    "cls_name", ["ScheduleInterleaved1F1B", "ScheduleZBVZeroBubble", "ScheduleInterleavedZeroBubble"]
)
def test_pytorch_schedules_load_validate_and_simulate(cls_name):
    import csv
    import io

    order = _torch_pipeline_order(cls_name, pp=4, m=8)
    buf = io.StringIO()
    writer = csv.writer(buf)
    for rank in sorted(order):
        writer.writerow(["" if a is None else str(a) for a in order[rank]])
    plan = validate(Plan.from_csv(buf.getvalue()))
    assert plan.pp == 4 and plan.num_stages == 8 and plan.microbatches == 8
    validate(lower(plan))
    result = simulate(plan, Costs(F=1, B=1, W=1))
    assert 0 <= result.bubble_rate < 0.3


@pytest.mark.parametrize("name", SYNC)
def test_our_plans_pass_pytorchs_validator(name):
    from torch.distributed.pipelining.schedules import _Action, _validate_schedule

    plan = get_schedule(name, pp=4, microbatches=8)
    rows = [[_Action.from_str(cell) for cell in line.split(",")] for line in plan.to_torch_csv().splitlines()]
    mapping = _validate_schedule(dict(enumerate(rows)), 4, plan.num_stages, 8)
    assert [mapping[s] for s in range(plan.num_stages)] == list(plan.stage_to_rank)


def test_grid_marks_a_cell():
    plan = get_schedule("1f1b", pp=2, microbatches=2)
    grid = plan.grid(mark=(1, 1))
    assert "[1B0]" in grid.splitlines()[2]
    assert grid.splitlines()[1].startswith("rank 0")


def test_split_and_merge_backward():
    plan = get_schedule("1f1b", pp=3, microbatches=4)
    split = split_backward(plan)
    assert all(split.splits_backward(s, mb) for s in range(3) for mb in range(4))
    validate(split)
    assert merge_backward(split) == plan
    # an unsplit backward costs B+W; split, the gradient leaves after B and W follows, so the work is the
    # same and the upstream stage gets its input sooner
    c = Costs(F=1, B=1, W=1)
    whole, parts = simulate(plan, c), simulate(split, c)
    assert [whole.timeline.busy(r) for r in range(3)] == [parts.timeline.busy(r) for r in range(3)] == [12.0] * 3
    assert (whole.makespan, parts.makespan) == (18.0, 16.0)


def test_add_comm_places_transfers_and_skips_local_edges():
    plan = add_comm(get_schedule("zb-v", pp=2, microbatches=4))
    r1 = [str(a) for a in plan.ranks[1]]
    assert "1SEND_F0" not in r1  # stages 1 and 2 share rank 1: no transfer
    assert r1.index("1RECV_F0") < r1.index("1F0")
    assert "2SEND_F0" in r1 and r1.index("2SEND_F0") > r1.index("2F0")
    validate(plan)
    assert add_comm(plan) is plan


def test_bad_names_sizes_and_options_are_refused_with_the_value():
    with pytest.raises(ScheduleError, match="unknown schedule 'zz'.*gpipe"):
        get_schedule("zz", pp=2, microbatches=2)
    with pytest.raises(ScheduleError, match="pp must be a positive integer, got 0"):
        get_schedule("1f1b", pp=0, microbatches=2)
    with pytest.raises(ScheduleError, match="microbatches=6 must be a multiple of pp=4"):
        get_schedule("interleaved-1f1b", pp=4, microbatches=6)
    with pytest.raises(ScheduleError, match="vpp=3 is not supported"):
        get_schedule("1f1b", pp=2, microbatches=2, vpp=3)
    with pytest.raises(ScheduleError, match=r"unknown option\(s\) \['bogus'\]"):
        get_schedule("pipedream", pp=2, microbatches=2, bogus=1)
    with pytest.raises(ScheduleError, match="update_every=2 must be an integer >= pp=4"):
        get_schedule("pipedream-2bw", pp=4, microbatches=8, update_every=2)


def test_user_schedules_register_by_decorator_and_by_subclass():
    @register_schedule("test-reverse-gpipe")
    def reverse_gpipe(pp, microbatches, vpp=None, reverse=True):
        order = [f"F{i}" for i in range(microbatches)]
        order += [f"B{i}" for i in (reversed(range(microbatches)) if reverse else range(microbatches))]
        return plan_from_lists([[f"{s}{a}" for a in order] for s in range(pp)], microbatches=microbatches)

    class AllForwardThenBackward(Schedule):
        name = "test-subclassed"

        def build(self):
            return get_schedule("gpipe", self.pp, self.microbatches).replace(name=self.name)

    plan = validate(get_schedule("test-reverse-gpipe", pp=3, microbatches=4))
    assert plan.name == "test-reverse-gpipe" and str(plan.ranks[0][-1]) == "0B0"
    assert get_schedule("test-reverse-gpipe", pp=3, microbatches=4, reverse=False).ranks[0][-1] == Action.parse("0B3")
    assert simulate(plan).makespan == simulate(get_schedule("gpipe", 3, 4)).makespan
    assert "test-subclassed" in list_schedules()
    assert validate(get_schedule("test-subclassed", pp=2, microbatches=3)).name == "test-subclassed"


def test_a_plan_loaded_from_csv_works_like_a_builtin(tmp_path):
    path = tmp_path / "mine.csv"
    get_schedule("zb-h1", pp=4, microbatches=8).to_csv(str(path))

    @register_schedule("test-from-file")
    def from_file(pp, microbatches, vpp=None, path=str(path)):
        return Plan.from_csv(path)

    plan = get_schedule("test-from-file", pp=4, microbatches=8)
    assert simulate(plan, Costs(F=1, B=1, W=1)).makespan == 27


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(ALL),
    pp=st.integers(1, 6),
    mult=st.integers(1, 4),
    extra=st.integers(0, 3),
    vpp=st.integers(2, 3),
)
def test_every_builtin_plan_validates_and_simulates(name, pp, mult, extra, vpp):
    m = pp * mult if name in ("interleaved-1f1b", "pipedream-2bw") else pp * mult + extra
    kwargs = {"vpp": vpp} if name == "interleaved-1f1b" else {}
    plan = get_schedule(name, pp=pp, microbatches=m, **kwargs)
    validate(plan)
    validate(lower(plan))
    result = simulate(plan, Costs(F=1, B=1.5, W=0.5, comm=0.1))
    assert 0 <= result.bubble_rate < 1
    assert result.bubble_time_ratio == pytest.approx(result.bubble_rate / (1 - result.bubble_rate))
    counts = {k: sum(1 for a in plan.actions() if a.kind is k) for k in (Kind.F, Kind.B)}
    assert counts[Kind.F] == plan.num_stages * m
    assert counts[Kind.B] == (0 if name == "forward-only" else plan.num_stages * m)


def test_tied_sync_precedes_every_update_of_a_tied_stage():
    sync = lower(get_schedule("1f1b", pp=2, microbatches=2), tied_stages=(0, 1))
    for plan in (sync, lower(get_schedule("pipedream", pp=2, microbatches=4), tied_stages=(0, 1))):
        validate(plan)
        for actions in plan.ranks:
            for i, a in enumerate(actions):
                if a.kind is Kind.UPDATE:
                    assert actions[i - 1].kind is Kind.SYNC_TIED and actions[i - 1].stage == a.stage
    assert (
        sum(
            a.kind is Kind.SYNC_TIED
            for a in lower(get_schedule("pipedream", pp=2, microbatches=4), tied_stages=(0, 1)).actions()
        )
        == 2 * 4
    )
