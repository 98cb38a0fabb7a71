#!/usr/bin/env bash
# Creates .venv on the Lambda runtime's Python and installs requirements-dev.txt,
# again only when a requirements file changed since the last install.
# `make dev`, `make test`, `make token` and `make lint` run it first. It writes
# only to stderr, so `TOKEN=$(make token ...)` captures the token alone.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash scripts/python.sh)
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $py" >&2
  "$py" -m venv .venv
fi
stamp=.venv/.requirements.sha
sum=$(cat requirements-dev.txt shared/requirements.txt functions/*/requirements.txt 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ]; then
  echo "bootstrap: installing requirements-dev.txt into .venv" >&2
  .venv/bin/python -m pip install --quiet --upgrade pip >&2
  .venv/bin/python -m pip install --quiet -r requirements-dev.txt >&2
  .venv/bin/python -c "import agents, upstash_redis, fakeredis, moto" >&2
  echo "$sum" > "$stamp"
fi
