#!/usr/bin/env bash
# Creates .venv on the Lambda runtime's Python and installs requirements-dev.txt,
# again only when a requirements file changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash scripts/python.sh)
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $py"
  "$py" -m venv .venv
fi
stamp=.venv/.requirements.sha
sum=$(cat requirements-dev.txt shared/requirements.txt functions/*/requirements.txt 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ]; then
  echo "bootstrap: installing requirements-dev.txt into .venv"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements-dev.txt
  .venv/bin/python -c "import agents, upstash_redis, fakeredis, moto"
  echo "$sum" > "$stamp"
fi
