# Packaging for pipeloom: the top-level folders install as subpackages of the one package `pipeloom`.
from setuptools import setup
from setuptools.command.build_py import build_py


# Each top-level folder becomes pipeloom.<folder>; nothing else lands in site-packages.
SUBPACKAGES = ["schedules", "parallel", "models", "kernels", "launch", "configs", "data", "training", "inference",
               "serving"]


class BuildPy(build_py):
    """The repository root is the package `pipeloom`; keep this script out of it."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if not (package == "pipeloom" and m[1] == "setup")]


setup(
    name="pipeloom",
    cmdclass={"build_py": BuildPy},
    version="0.1.0",
    description="Pipeline-parallel training and inference of transformers, with schedules as data.",
    python_requires=">=3.10",
    packages=["pipeloom"] + [f"pipeloom.{name}" for name in SUBPACKAGES]
    + ["pipeloom.schedules.batching", "pipeloom.inference.quant", "pipeloom.inference.parallel"],
    package_dir={"pipeloom": "."},
    package_data={"pipeloom.configs": ["*.yaml", "*/*.yaml"], "pipeloom.serving": ["proto/*.proto"]},
    install_requires=[
        "torch>=2.4",  # the Makefile pins torch==2.13.0 before installing us (its TORCH_INDEX picks the build)
        "einops>=0.7",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "numpy",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-timeout",
            "pytest-xdist",  # make test runs the suite on TEST_WORKERS processes, a test file per worker
            "hypothesis>=6",
            "ruff",
            "transformers",
            "safetensors",
            "tokenizers",
            "triton",
            "torchao",
            # serving tests: the server and the clients users use
            "fastapi",
            "uvicorn",
            "websockets",
            "grpcio",
            "grpcio-tools",
            "prometheus-client",
            "jinja2",
            "openai",
            "httpx",
        ],
        "quant": ["torchao"],  # torchao's quantized layouts, compared with pipeloom's own (inference.quant)
        "wandb": ["wandb"],
        "deepspeed": ["deepspeed"],
        "triton": ["triton"],
        "serve": ["fastapi", "uvicorn", "websockets", "grpcio", "grpcio-tools", "prometheus-client", "jinja2"],
    },
    entry_points={
        "console_scripts": [
            "pipeloom-bubbles=pipeloom.launch.bubbles:main",
            "pipeloom-batching=pipeloom.launch.batching:main",
            "pipeloom-train=pipeloom.launch.train:main",
            "pipeloom-generate=pipeloom.launch.generate:main",
            "pipeloom-serve=pipeloom.launch.serve:main",
        ]
    },
)
