# pipeloom: `make demo` trains a small model on 4 CPU processes; `make test` runs the whole suite.
PY ?= python3
# Where pip finds torch; empty: pip's own configuration. make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
# Processes the suite runs on (pytest-xdist, one test file at a time per process): make test TEST_WORKERS=0 runs it
# in this one process. The multi-rank tests start their own ranks either way.
TEST_WORKERS ?= 2
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install lint clean

$(STAMP): setup.py pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel
	# torch pinned. From the plain package index on Linux this is the CUDA build; TORCH_INDEX (README) picks another.
	$(VPY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VPY) -m pip install -q -e '.[dev]' torch==2.13.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VPY) -m pipeloom.launch.demo

test: $(STAMP)
	$(VPY) -m pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

lint: $(STAMP)
	$(VPY) -m ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info
