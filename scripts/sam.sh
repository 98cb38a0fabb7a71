#!/usr/bin/env bash
# Runs the pinned AWS SAM CLI: `bash scripts/sam.sh validate --lint`, `bash scripts/sam.sh build`.
#
# aws-sam-cli pins many of its dependencies, so it lives in its own venv
# (.venv-sam), apart from the project's .venv. The venv is created with the
# Lambda runtime's python3.13 and (re)installed only when the pins below change.
# `sam build` (BuildMethod python3.13) needs python3.13 on PATH: the found
# interpreter's bin dir is put in front of PATH before exec'ing sam.
# sam runs in the caller's working directory, like sam itself.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

SAM_CLI_VERSION=1.170.0
CFN_LINT_VERSION=1.58.0
venv=$root/.venv-sam

# python3.13 on PATH, else pyenv's. scripts/python.sh may fall back to another
# version; sam build cannot, so insist on 3.13 here.
py=""
if command -v python3.13 >/dev/null 2>&1 && python3.13 -c '' >/dev/null 2>&1; then
  py=$(command -v python3.13)
elif command -v pyenv >/dev/null 2>&1 && [ -x "$(pyenv root)/versions/3.13.0/bin/python3.13" ]; then
  py="$(pyenv root)/versions/3.13.0/bin/python3.13"
elif [ -x "${PYENV_ROOT:-$HOME/.pyenv}/versions/3.13.0/bin/python3.13" ]; then
  py="${PYENV_ROOT:-$HOME/.pyenv}/versions/3.13.0/bin/python3.13"
else
  for cand in "$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"/versions/3.13.*/bin/python3.13; do
    [ -x "$cand" ] && py=$cand
  done
fi
if [ -z "$py" ]; then
  echo "sam.sh: python3.13 (the Lambda runtime) not found on PATH or in pyenv" >&2
  exit 1
fi
# Resolve pyenv shims to the real interpreter, so its bin dir is the one we prepend.
py=$("$py" -c 'import sys; print(sys.executable)')
pybin=$(dirname "$py")

if [ ! -x "$venv/bin/python" ]; then
  echo "sam.sh: creating $venv with $py" >&2
  "$py" -m venv "$venv"
fi
stamp=$venv/.sam.sha
sum=$(printf 'aws-sam-cli==%s\ncfn-lint==%s\n%s\n' "$SAM_CLI_VERSION" "$CFN_LINT_VERSION" "$py" | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ] || [ ! -x "$venv/bin/sam" ]; then
  echo "sam.sh: installing aws-sam-cli==$SAM_CLI_VERSION cfn-lint==$CFN_LINT_VERSION into $venv" >&2
  pip_log=$venv/pip-install.log
  if ! { "$venv/bin/python" -m pip install --disable-pip-version-check --upgrade pip &&
         "$venv/bin/python" -m pip install --disable-pip-version-check \
           "aws-sam-cli==$SAM_CLI_VERSION" "cfn-lint==$CFN_LINT_VERSION"; } >"$pip_log" 2>&1; then
    tail -40 "$pip_log" >&2
    echo "sam.sh: pip install failed (full log: $pip_log)" >&2
    exit 1
  fi
  echo "$sum" > "$stamp"
fi

export SAM_CLI_TELEMETRY=0
export SAM_CLI_CONTAINER_CONNECTION_TIMEOUT=${SAM_CLI_CONTAINER_CONNECTION_TIMEOUT:-20}
# python3.13 first (sam build's python3.13 workflow looks it up on PATH), then
# the SAM venv (its own cfn-lint), then the rest.
export PATH="$pybin:$venv/bin:$PATH"
exec "$venv/bin/sam" "$@"
