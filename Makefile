# Two entry points on a fresh machine: `make demo` and `make test`. Each creates .venv by itself:
# `make demo` installs what the toolkit runs on, `make test` adds the test and benchmark extras.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
RUNTIME := $(VENV)/.installed-runtime
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo-out
# every toolkit module, the tiny models' transformers classes and what the stages import lazily
WARM := import importlib, pkgutil, transformers; \
	[importlib.import_module(m.name) for p in ("soir", "unlearn", "analysis", "soirlab") \
	 for m in pkgutil.walk_packages(importlib.import_module(p).__path__, p + ".") if not m.name.endswith("__main__")]; \
	[getattr(transformers, c) for c in ("OlmoForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM")]; \
	import matplotlib.pyplot, scipy.stats, rouge_score.rouge_scorer, pyarrow.parquet, safetensors.torch

.PHONY: demo test bench install clean

install: $(STAMP)

# Torch first (the local CPU build when none is importable), then a constraints file
# pinning whatever torch is there, so no later install replaces it with a CUDA build.
# --no-compile: pip would byte-compile all ~15,000 modules of torch, transformers and the rest
# (about a minute of a fresh install on 2 cores); importing what the toolkit uses ($(WARM))
# compiles only those, with PYTHONDONTWRITEBYTECODE cleared for that one command so that later
# runs start from bytecode even where it is set.
$(RUNTIME): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q --no-compile torch==2.13.0
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(PIP) install -q --no-compile -c $(VENV)/constraints.txt -e .
	PYTHONDONTWRITEBYTECODE= $(PY) -c '$(WARM)'
	touch $@

$(STAMP): $(RUNTIME)
	$(PIP) install -q --no-compile -c $(VENV)/constraints.txt -e '.[test,bench]'
	PYTHONDONTWRITEBYTECODE= $(PY) -c 'import pytest, pytest_timeout, nbclient, nbformat, ipykernel, psutil'
	touch $@

demo: $(RUNTIME)
	$(VENV)/bin/soir demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) build *.egg-info
