# pipeloom: pipeline-parallel training and inference of transformers, with schedules as data.
"""pipeloom — schedules as pluggable plans, a runtime that executes them on real stages, tensor
parallelism, and inference with the same machinery.

Subpackages: ``schedules`` (the plan IR, every schedule, the simulator), ``parallel`` (process groups,
the runtime, tensor parallelism), ``models``, ``kernels``, ``launch``, ``configs``.
"""

__version__ = "0.1.0"
