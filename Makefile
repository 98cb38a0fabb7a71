# The two commands: `make dev` runs the whole stack locally, `make test` runs every check.
# Deploying uses the SAM CLI pinned in scripts/sam.sh (installed into .venv-sam on first use).
.PHONY: help dev test lint bench load token build deploy clean

# The samconfig.toml environment `make deploy` uses: dev (stack rejoin-dev) or prod (rejoin-prod).
SAM_ENV ?= dev

help:  ## this list
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

dev:  ## the whole stack on this machine: open the page link it prints (ARGS="--port 9000 ...")
	@bash scripts/dev.sh $(ARGS)

test:  ## venv, Chromium, ruff, mypy, sam validate/build, docs check, pytest (ARGS go to pytest)
	@bash scripts/test.sh $(ARGS)

lint:  ## ruff, ruff format --check, mypy --strict
	@bash scripts/bootstrap.sh && .venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

bench:  ## benchmarks; figures go in bench/README.md
	@bash scripts/bootstrap.sh && .venv/bin/python -m bench $(ARGS)

load:  ## the local stack under load: 500 sessions x 2 WebSocket clients (ARGS="--quick", "--sessions 100")
	@bash scripts/bootstrap.sh && .venv/bin/python -m bench --only load $(ARGS)

token:  ## print a local participant token: make token ARGS="--session demo --user u1 --name Ada"
	@bash scripts/bootstrap.sh && REJOIN_TOKEN_SECRET=$${REJOIN_TOKEN_SECRET:-local-dev-signing-key-change-me-0123456789} \
		PYTHONPATH=shared .venv/bin/python -m rejoin.tokens $(ARGS)

build:  ## sam build (the pinned SAM CLI): the layer and the functions, into .aws-sam/build
	@bash scripts/sam.sh build

deploy:  ## sam build + sam deploy --config-env $(SAM_ENV) (stack rejoin-$(SAM_ENV)); first time: ARGS=--guided
	@bash scripts/sam.sh build && bash scripts/sam.sh deploy --config-env $(SAM_ENV) $(ARGS)

clean:  ## remove the venvs, build output and caches
	rm -rf .aws-sam .venv .venv-sam .pytest_cache .mypy_cache .ruff_cache test-artifacts
