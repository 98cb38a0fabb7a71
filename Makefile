# The two commands: `make dev` runs the whole stack locally, `make test` runs every check.
.PHONY: dev test lint bench token clean

dev:  ## the whole stack on this machine: http://127.0.0.1:8080/
	bash scripts/dev.sh $(ARGS)

test:  ## venv, Chromium, ruff, mypy, sam validate/build, pytest
	bash scripts/test.sh $(ARGS)

lint:
	bash scripts/bootstrap.sh && .venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

bench:  ## benchmarks; figures go in bench/README.md
	bash scripts/bootstrap.sh && .venv/bin/python -m bench $(ARGS)

token:  ## a local participant token: make token ARGS="--session demo --user u1 --name Ada"
	bash scripts/bootstrap.sh && REJOIN_TOKEN_SECRET=$${REJOIN_TOKEN_SECRET:-local-dev-signing-key-change-me-0123456789} \
		PYTHONPATH=shared .venv/bin/python -m rejoin.tokens $(ARGS)

clean:
	rm -rf .aws-sam .venv .venv-sam .pytest_cache .mypy_cache .ruff_cache test-artifacts
