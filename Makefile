# The two README commands: `make serve` and `make test` (plus `make lint`, `make unit`).
VENV := .venv
export VLLM_CPU_KVCACHE_SPACE ?= 1
export HF_HUB_OFFLINE ?= 1

.PHONY: install serve test unit lint format

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/unlearnd serve $(ARGS)

test: install
	$(VENV)/bin/python -m pytest -q $(ARGS)

unit: install
	$(VENV)/bin/python -m pytest -q tests/unit $(ARGS)

lint: install
	$(VENV)/bin/ruff check unlearnd tests scripts
	$(VENV)/bin/ruff format --check unlearnd tests scripts

format: install
	$(VENV)/bin/ruff check --fix unlearnd tests scripts
	$(VENV)/bin/ruff format unlearnd tests scripts
