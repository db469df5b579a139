# The mesh: degrees validated with messages naming the numbers; groups and pipeline peers on 4 gloo ranks.
import pytest
import torch
import torch.distributed as dist
from pipeloom.parallel.mesh import Mesh, ParallelDims


def test_dims_refuse_product_mismatch_naming_values():
    with pytest.raises(ValueError, match=r"dp=2 \* pp=2 \* tp=2 = 8 != world_size=4"):
        ParallelDims(dp=2, pp=2, tp=2, world_size=4)
    with pytest.raises(ValueError, match=r"tp=0 must be a positive integer"):
        ParallelDims(dp=4, pp=1, tp=0, world_size=4)


def test_dims_refuse_tp_not_dividing_model_sizes():
    dims = ParallelDims(dp=1, pp=1, tp=4, world_size=4)
    dims.check_divides(n_heads=8, dim=64)
    with pytest.raises(ValueError, match=r"tp=4 does not divide n_heads=6"):
        dims.check_divides(n_heads=6, dim=64)
    with pytest.raises(ValueError, match=r"tp=4 does not divide ffn_hidden=90"):
        dims.check_divides(ffn_hidden=90)


def test_rank_layout_tp_innermost():
    dims = ParallelDims(dp=2, pp=3, tp=2, world_size=12)
    assert [dims.coordinate(r) for r in range(4)] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    assert all(dims.rank_of(*dims.coordinate(r)) == r for r in range(12))
    assert dims.group_ranks("tp", 5) == [4, 5]  # adjacent
    assert dims.group_ranks("pp", 1) == [1, 3, 5]
    assert dims.group_ranks("dp", 3) == [3, 9]
    with pytest.raises(ValueError, match=r"pp_rank=3 is outside 0..2"):
        dims.rank_of(0, 3, 0)


def _mesh_worker(shape):
    dp, pp, tp = shape
    mesh = Mesh.build(dp=dp, pp=pp, tp=tp)
    rank = dist.get_rank()
    out = {"coord": (mesh.dp_rank, mesh.pp_rank, mesh.tp_rank)}
    for dim in ("dp", "pp", "tp"):
        group = getattr(mesh, f"{dim}_group")
        out[f"{dim}_ranks"] = dist.get_process_group_ranks(group)
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=group)
        out[f"{dim}_sum"] = t.item()
    out["pp_peers"] = mesh.pp_peers
    return out


@pytest.mark.parametrize("shape", [(1, 2, 2), (2, 1, 2), (2, 2, 1), (1, 1, 4)])
def test_mesh_groups_match_layout(pool4, shape):
    dims = ParallelDims(*shape, world_size=4)
    results = pool4.run(_mesh_worker, shape)
    for rank, res in enumerate(results):
        assert res["coord"] == dims.coordinate(rank)
        for dim in ("dp", "pp", "tp"):
            ranks = dims.group_ranks(dim, rank)
            assert res[f"{dim}_ranks"] == ranks
            assert res[f"{dim}_sum"] == float(sum(ranks))  # the group really reduces over those ranks
        assert res["pp_peers"] == dims.group_ranks("pp", rank)


def _bad_mesh_worker():
    try:
        Mesh.build(dp=1, pp=3, tp=2)
    except ValueError as e:
        return str(e)
    return None


def test_mesh_build_refuses_bad_degrees(pool4):
    messages = pool4.run(_bad_mesh_worker)
    assert all(m is not None and "dp=1 * pp=3 * tp=2 = 6 != world_size=4" in m for m in messages)
