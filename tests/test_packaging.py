# Packaging: the wheel holds the one package `pipeloom` (no top-level models/, parallel/, tests/).
import glob
import shutil
import subprocess
import sys
import zipfile

import pytest


@pytest.mark.slow
def test_wheel_contains_only_the_pipeloom_package(tmp_path):
    root = __file__.rsplit("/tests/", 1)[0]
    src = tmp_path / "src"  # a clean copy: an in-tree build/ folder may hold stale files
    shutil.copytree(
        root,
        src,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "*.egg-info", "__pycache__", "multirun", "outputs", "runs", ".carry"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )
    names = zipfile.ZipFile(glob.glob(str(tmp_path / "dist" / "*.whl"))[0]).namelist()
    assert {n.split("/")[0] for n in names} == {"pipeloom", "pipeloom-0.1.0.dist-info"}
    for module in (
        "pipeloom/schedules/ir.py",
        "pipeloom/schedules/batching/scheduler.py",
        "pipeloom/parallel/spawn.py",
        "pipeloom/configs/bubbles.yaml",
        "pipeloom/inference/engine.py",
        "pipeloom/configs/generate.yaml",
        "pipeloom/__init__.py",
        "pipeloom/features.py",
        "pipeloom/inference/quant/apply.py",
        "pipeloom/inference/parallel/driver.py",
        "pipeloom/serving/proto/pipeloom_serving.proto",  # gRPC code is generated from it at first use
    ):
        assert module in names
    assert not any(n.startswith("pipeloom/tests/") or n == "pipeloom/setup.py" for n in names)


def test_ruff_is_clean():
    """`make lint` (ruff, configured in pyproject.toml) passes on the whole repository."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        import pytest

        pytest.skip("ruff is not installed (it comes with pip install -e '.[dev]')")
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([ruff, "check", "--output-format", "concise", "."], cwd=repo, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]


def _repository_files(*suffixes: str) -> list[str]:
    import os

    root = __file__.rsplit("/tests/", 1)[0]
    skip = {".venv", ".git", "build", "__pycache__", "runs", "multirun", "outputs", ".carry"}
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
        found += [os.path.join(folder, f) for f in files if f.endswith(suffixes)]
    return found


def test_docs_cite_no_file_outside_the_repository():
    """Facts the code relies on live in docs/ and in the papers the code cites, not in a facts file that only
    the developers had; bench/RESULTS.md keeps its dated history as written."""
    name = "REFER" + "ENCE"  # spelt apart so that a grep for it finds no file of the repository, this one included
    citing = [path for path in _repository_files(".py", ".md") if not path.endswith("bench/RESULTS.md")
              and name in open(path, encoding="utf-8").read()]
    assert not citing, citing


def test_make_takes_the_torch_index_from_torch_index(tmp_path):
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make on this machine")
    root = __file__.rsplit("/tests/", 1)[0]
    out = subprocess.run([make, "-n", "-C", root, f"VENV={tmp_path / 'venv'}", "install",
                          "TORCH_INDEX=https://example.invalid/whl/cpu"], capture_output=True, text=True, timeout=60)
    torch_lines = [line for line in out.stdout.splitlines() if "pip install -q torch==" in line]
    assert torch_lines and torch_lines[0].endswith("--index-url https://example.invalid/whl/cpu"), out.stdout
