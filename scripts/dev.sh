#!/usr/bin/env bash
# The whole rejoin stack on this machine (`make dev`): bootstraps .venv, then
# runs `python -m rejoin_local` with any arguments given (see --help).
#
#   bash scripts/dev.sh                       # http://127.0.0.1:8080/
#   bash scripts/dev.sh --port 9000 --grace 10
#   REDIS_URL=redis://127.0.0.1:6379/0 bash scripts/dev.sh
#   bash scripts/dev.sh client --session demo --name Ada   # the terminal client
#   bash scripts/dev.sh openai-stub --port 8090            # a local OpenAI-compatible server
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PYTHONPATH="$PWD/local:$PWD/shared${PYTHONPATH:+:$PYTHONPATH}"
if [ "${1:-}" = "client" ]; then
  shift
  exec .venv/bin/python -m rejoin_local.client "$@"
fi
if [ "${1:-}" = "openai-stub" ]; then
  shift
  exec .venv/bin/python -m rejoin_local.openai_stub "$@"
fi
exec .venv/bin/python -m rejoin_local "$@"
