# The two README commands: `make serve` and `make test`.
VENV := .venv
export VLLM_CPU_KVCACHE_SPACE ?= 1
export HF_HUB_OFFLINE ?= 1

.PHONY: install serve test unit

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/unlearnd serve $(ARGS)

test: install
	$(VENV)/bin/python -m pytest -q $(ARGS)

unit: install
	$(VENV)/bin/python -m pytest -q tests/unit $(ARGS)
