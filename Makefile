# pipeloom: `make demo` trains a small model on 4 CPU processes; `make test` runs the whole suite.
PY ?= python3
# Where pip finds torch; empty: pip's own configuration. make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
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
	$(VPY) -m pytest

lint: $(STAMP)
	$(VPY) -m ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info
