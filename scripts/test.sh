#!/usr/bin/env bash
# `make test`: everything a fresh machine needs, then every check.
#   1. .venv on python3.13 with requirements-dev.txt (scripts/bootstrap.sh)
#   2. Debian's Chromium for the browser test (scripts/ensure-chromium.sh)
#   3. ruff (lint + format) and mypy --strict
#   4. sam validate --lint and sam build (scripts/check-template.sh)
#   5. pytest: the tests start their own redis-server on a free port (or the
#      embedded store when there is no redis-server binary) and the local
#      Upstash-compatible endpoint in front of it; tests/test_docs.py runs the
#      commands of README.md and docs/. Every skipped test is listed with its
#      reason (-rs), so nothing is skipped silently.
# Extra arguments go to pytest, e.g. `make test ARGS="-k rooms"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
if ! command -v redis-server >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "test: installing redis-server (the store tests run against a real Redis)"
  (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) || \
    echo "test: could not install redis-server; the tests fall back to the embedded store" >&2
fi
bash scripts/ensure-chromium.sh || echo "test: no Chromium; the browser test will be skipped" >&2
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
echo "== template"
bash scripts/check-template.sh
echo "== pytest"
.venv/bin/python -m pytest -q -rs -p no:cacheprovider "$@"
