# The one object that owns pipeloom's process groups: data (dp), pipeline (pp) and tensor (tp) parallelism.
"""Parallel degrees and the device mesh built from them.

:class:`ParallelDims` is pure arithmetic (no process group): it validates ``dp * pp * tp == world_size``
in ``__post_init__`` and maps a global rank to its ``(dp, pp, tp)`` coordinate and back. It can be
tested in one process.

:class:`Mesh` adds the ``torch.distributed.device_mesh.DeviceMesh`` with dims ``("dp", "pp", "tp")`` -
tp innermost, so the ranks of one tensor-parallel group are adjacent (on a multi-GPU host they share the
fastest links, as in Megatron-LM, arXiv 1909.08053 §3 and arXiv 2104.04473 §3.3). It exposes the three
process groups, this rank's coordinate, and the global ranks of the pipeline peers, and owns the
per-direction p2p groups of the pipeline links (:attr:`Mesh.links`, created by the first pipeline runtime
built on it and reused by later ones). It is passed explicitly to whatever needs a group; nothing is kept
in module-level globals.

Rank layout (row-major over ``(dp, pp, tp)``)::

    rank = (dp_rank * pp + pp_rank) * tp + tp_rank
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from .links import PipelineLinks


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of data, pipeline and tensor parallelism over ``world_size`` ranks (validated)."""

    dp: int  # data-parallel replicas
    pp: int  # pipeline stages
    tp: int  # tensor-parallel shards of every layer
    world_size: int  # number of ranks; must equal dp * pp * tp

    def __post_init__(self) -> None:
        for name in ("dp", "pp", "tp", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.dp * self.pp * self.tp != self.world_size:
            raise ValueError(
                f"dp={self.dp} * pp={self.pp} * tp={self.tp} = {self.dp * self.pp * self.tp} "
                f"!= world_size={self.world_size}; choose degrees whose product is the number of ranks"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        """The mesh shape ``(dp, pp, tp)``."""
        return (self.dp, self.pp, self.tp)

    def coordinate(self, rank: int) -> tuple[int, int, int]:
        """``(dp_rank, pp_rank, tp_rank)`` of global ``rank``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} is outside 0..{self.world_size - 1}")
        dp_pp, tp_rank = divmod(rank, self.tp)
        dp_rank, pp_rank = divmod(dp_pp, self.pp)
        return dp_rank, pp_rank, tp_rank

    def rank_of(self, dp_rank: int, pp_rank: int, tp_rank: int) -> int:
        """Global rank at coordinate ``(dp_rank, pp_rank, tp_rank)``."""
        for name, value, size in (("dp_rank", dp_rank, self.dp), ("pp_rank", pp_rank, self.pp),
                                  ("tp_rank", tp_rank, self.tp)):
            if not 0 <= value < size:
                raise ValueError(f"{name}={value} is outside 0..{size - 1}")
        return (dp_rank * self.pp + pp_rank) * self.tp + tp_rank

    def group_ranks(self, dim: str, rank: int) -> list[int]:
        """Global ranks of the ``dim`` group ("dp", "pp" or "tp") that contains ``rank``, in group order."""
        coord = list(self.coordinate(rank))
        axis = ("dp", "pp", "tp").index(dim)
        ranks = []
        for i in range(self.shape[axis]):
            coord[axis] = i
            ranks.append(self.rank_of(*coord))
        return ranks

    def check_divides(self, **sizes: int) -> None:
        """Raise ``ValueError`` naming the value unless ``tp`` divides every size given.

        ``dims.check_divides(n_heads=12, n_kv_heads=4, dim=768, ffn_hidden=3072)``: tensor parallelism
        splits heads and hidden widths evenly across the tp ranks (arXiv 1909.08053 §3).
        """
        for name, size in sizes.items():
            if size is not None and size % self.tp:
                raise ValueError(
                    f"tp={self.tp} does not divide {name}={size}; choose tp among the divisors of {size}"
                )


@dataclass
class Mesh:
    """``ParallelDims`` plus the ``DeviceMesh`` and process groups of this rank.

    Build with :meth:`Mesh.build` after ``torch.distributed`` is initialised (every rank must call it,
    in the same order, since it creates process groups).
    """

    dims: ParallelDims
    device_mesh: Any = field(repr=False)  # torch.distributed.device_mesh.DeviceMesh, dims ("dp", "pp", "tp")
    links: PipelineLinks = field(default_factory=PipelineLinks, repr=False, compare=False)  # pipeline p2p groups

    @classmethod
    def build(cls, dp: int = 1, pp: int = 1, tp: int = 1, device_type: str = "cpu") -> Mesh:
        """Validate the degrees against the world size and create the ``(dp, pp, tp)`` device mesh.

        ``device_type`` is ``"cpu"`` for gloo, ``"cuda"`` for NCCL.
        """
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            raise RuntimeError("Mesh.build needs torch.distributed initialised (dist.init_process_group) first")
        dims = ParallelDims(dp=dp, pp=pp, tp=tp, world_size=dist.get_world_size())
        device_mesh = init_device_mesh(device_type, dims.shape, mesh_dim_names=("dp", "pp", "tp"))
        return cls(dims=dims, device_mesh=device_mesh)

    # Degrees, forwarded for convenience.
    @property
    def dp(self) -> int:
        return self.dims.dp

    @property
    def pp(self) -> int:
        return self.dims.pp

    @property
    def tp(self) -> int:
        return self.dims.tp

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    # Process groups.
    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.device_mesh.get_group("dp")

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.device_mesh.get_group("pp")

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self.device_mesh.get_group("tp")

    # This rank's coordinate.
    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def dp_rank(self) -> int:
        return self.device_mesh.get_local_rank("dp")

    @property
    def pp_rank(self) -> int:
        return self.device_mesh.get_local_rank("pp")

    @property
    def tp_rank(self) -> int:
        return self.device_mesh.get_local_rank("tp")

    def pp_global_rank(self, stage_rank: int) -> int:
        """Global rank of pipeline stage ``stage_rank`` in this rank's pipeline (same dp and tp coordinate).

        Point-to-point sends/receives between stages take global ranks; this is the one place that maps.
        """
        return self.dims.rank_of(self.dp_rank, stage_rank, self.tp_rank)

    @property
    def pp_peers(self) -> list[int]:
        """Global ranks of every stage of this rank's pipeline, by stage."""
        return [self.pp_global_rank(s) for s in range(self.pp)]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1
