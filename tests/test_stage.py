# Splitting models into stages: layouts, rejected layouts, tied parameters, extras routing, split backward.
import pytest
import torch
from pipeloom.parallel.backward import backward_full, backward_input, backward_weight
from pipeloom.parallel.stage import Stage, balanced_partition, split_stages
from pipeloom.parallel.versions import update_groups
from pipeloom.schedules import get_schedule
from torch import nn


class Scaled(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x, scale=None):  # (B, W) -> (B, W)
        return torch.tanh(self.lin(x)) * (1.0 if scale is None else scale)


def layers(widths=(4, 4, 4, 4, 4, 4, 4)):
    torch.manual_seed(0)
    return [Scaled(w) for w in widths]


def test_uniform_and_explicit_layouts():
    assert split_stages(layers(), 3).layout == (3, 2, 2)
    assert split_stages(layers(), 3, method=[1, 4, 2]).layout == (1, 4, 2)
    assert split_stages(layers(), 2, method=[[0, 1, 2], [3, 4, 5, 6]]).layout == (3, 4)
    split = split_stages(layers(), 3, method=[2, 2, 3])
    assert [list(s.layer_ids) for s in split] == [[0, 1], [2, 3], [4, 5, 6]]
    assert "stage 2: layers 4-6 [Scaled x3]" in str(split)


@pytest.mark.parametrize("layout, words", [
    ([2, 2, 2], "drops layers"), ([3, 3, 3], "duplicates layers"), ([0, 3, 4], "at least one layer"),
    ([[0, 1], [1, 2, 3], [4, 5, 6]], "duplicated: [1]"), ([[0, 1], [3, 4], [5, 6]], "dropped: [2]"),
    ([[0, 2, 1], [3, 4], [5, 6]], "in order"), ([3, 4], "has 2 stages"),
])
def test_bad_layouts_are_rejected(layout, words):
    with pytest.raises(ValueError) as error:
        split_stages(layers(), 3, method=layout)
    assert words in str(error.value)


def test_more_stages_than_layers_is_an_error():
    with pytest.raises(ValueError, match="cannot split 7 layers into 8 stages"):
        split_stages(layers(), 8)


def test_parameter_balance_and_time_profile():
    big = layers((4, 4, 16, 4, 4, 4))  # parameters 20, 20, 272, 20, 20, 20 (never run, only counted)
    split = split_stages(big, 3, method="parameters")
    assert list(split[1].layer_ids) == [2] and split.costs[2] == 272.0
    layout = balanced_partition([1, 1, 1, 10, 1, 1, 6, 6], 3)
    assert sum(layout) == 8 and max(sum(c) for c in _parts([1, 1, 1, 10, 1, 1, 6, 6], layout)) == 12
    split = split_stages(layers(), 3, method="time", sample_input=torch.randn(8, 4))
    assert sum(split.layout) == 7 and len(split.costs) == 7 and all(c > 0 for c in split.costs)
    with pytest.raises(ValueError, match="needs sample_input"):
        split_stages(layers(), 3, method="time")


def _parts(costs, layout):
    out, i = [], 0
    for n in layout:
        out.append(costs[i:i + n])
        i += n
    return out


def test_stage_equals_sequential_and_routes_extras():
    ls = layers()
    seq = nn.Sequential(*ls)
    split = split_stages(ls, 3)
    x = torch.randn(5, 4)
    h = x
    for stage in split:
        h = stage(h, scale=0.5, unused=1)  # only `scale` reaches the layers that name it
    ref = x
    for layer in seq:
        ref = layer(ref, scale=0.5)
    assert torch.equal(h, ref)
    names = {n for s in split for n, _ in s.named_parameters()}
    assert names == {n for n, _ in seq.named_parameters()}
    assert Stage([nn.ReLU()]).wants("scale") is False and split[0].wants("scale")


def test_tied_parameters_are_found_across_stages():
    ls = layers()
    ls[-1].lin.weight = ls[0].lin.weight
    split = split_stages(ls, 3)
    assert split.tied == [{0: "0.lin.weight", 2: "6.lin.weight"}] and split.tied_stages == (0, 2)
    assert split_stages(ls, 1).tied == []  # same stage: autograd sums it


def test_split_backward_reuses_b_and_equals_full_backward():
    torch.manual_seed(0)
    shared = nn.Linear(6, 6).double()
    block = nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6)).double()
    params = list(block.parameters()) + list(shared.parameters())
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 6, dtype=torch.float64)

    def f(x):  # `shared` is used twice: its group falls back to a backward from the outputs
        return shared(torch.tanh(shared(block(x))))

    ref_in, ref_params = backward_full([f(x)], [g], [x], params)
    in_grads, state = backward_input([f(x)], [g], [x], params)
    assert sorted(state.fallback) == [6, 7] and len(state.groups) == 3  # LayerNorm, Linear, Linear
    grads = backward_weight(state)
    assert torch.equal(in_grads[0], ref_in[0])
    for a, b in zip(grads, ref_params):
        assert (a - b).abs().max() < 1e-14


def test_update_groups_normalise_the_loss_per_update():
    assert update_groups(get_schedule("1f1b", pp=2, microbatches=4)) == [(0, 1, 2, 3)]
    from pipeloom.schedules.lowering import lower

    assert update_groups(lower(get_schedule("zb-v", pp=2, microbatches=4))) == [(0, 1, 2, 3)]
    assert update_groups(get_schedule("pipedream", pp=2, microbatches=3)) == [(0,), (1,), (2,)]
    assert update_groups(get_schedule("pipedream-2bw", pp=2, microbatches=4)) == [(0, 1), (2, 3)]


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_split_backward_composes_with_recompute(mode):
    from pipeloom.models.config import ModelConfig
    from pipeloom.models.transformer import Transformer
    from pipeloom.parallel.apply import RecomputePolicy, apply_recompute

    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="llama", vocab_size=29, dim=16, n_layers=3, n_heads=2, max_seq_len=16))
    stage = split_stages(model.double(), 3, method=[1, 3, 1])[1]  # three blocks: float input, no embedding
    apply_recompute(stage, RecomputePolicy(mode))
    params = list(stage.parameters())
    x = torch.randn(2, 10, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 10, 16, dtype=torch.float64)
    ref_in, ref_params = backward_full([stage(x)], [g], [x], params)
    in_grads, state = backward_input([stage(x)], [g], [x], params)
    assert not state.fallback  # every parameter restarts from a captured split node
    assert torch.equal(in_grads[0], ref_in[0])
    for a, b in zip(backward_weight(state), ref_params):
        assert (a - b).abs().max() < 1e-14
