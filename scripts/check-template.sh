#!/usr/bin/env bash
# Template checks for CI and `make test`:
#   1. `sam validate --lint`: the SAM transform plus cfn-lint; any error OR warning fails.
#   2. `sam build`: the layer (shared/) and every function, for python3.13 on arm64,
#      into .aws-sam/build (cached in .aws-sam/cache): exactly what `sam deploy` ships.
#   3. On a host that is not arm64 (the arm64 wheels cannot be imported here), the same
#      build once more for the host's architecture into .aws-sam/host/build, from a
#      copy of the template that differs only in the architecture. The built-artefact
#      tests (tests/test_built_artifacts.py) invoke the handlers from that build.
# Usage: bash scripts/check-template.sh [--no-build] [--no-host-build]
set -euo pipefail
cd "$(dirname "$0")/.."

build=1
host_build=1
for arg in "$@"; do
  case "$arg" in
    --no-build) build=0 ;;
    --no-host-build) host_build=0 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "check-template: unknown argument $arg" >&2; exit 2 ;;
  esac
done

sam() { bash scripts/sam.sh "$@"; }

echo "check-template: $(sam --version) (cfn-lint $(.venv-sam/bin/cfn-lint --version | awk '{print $2}'))"

# 1. validate + lint. sam exits non-zero on any cfn-lint match (errors and
# warnings alike); the grep is a second guard in case that ever changes.
log=$(mktemp); trap 'rm -f "$log"' EXIT
if ! sam validate --lint --template-file template.yaml >"$log" 2>&1; then
  cat "$log" >&2
  echo "check-template: FAILED: sam validate --lint" >&2
  exit 1
fi
if grep -Eq '\[\[?[EW][0-9]{4}' "$log"; then
  cat "$log" >&2
  echo "check-template: FAILED: cfn-lint reported errors or warnings" >&2
  exit 1
fi
echo "check-template: validate --lint: clean ($(tail -1 "$log"))"

[ "$build" = 1 ] || exit 0

# 2. build. No Docker here: python3.13 must be on PATH (scripts/sam.sh puts it
# there); arm64 wheels are fetched by pip for the target platform.
missing=()
for fn in connect message disconnect turn cleanup api; do
  [ -f "functions/$fn/app.py" ] || missing+=("functions/$fn/app.py")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "check-template: FAILED: missing handler(s): ${missing[*]}" >&2
  exit 1
fi
start=$(date +%s)
if ! sam build --template-file template.yaml --build-dir .aws-sam/build \
    --cache-dir .aws-sam/cache --cached --parallel >"$log" 2>&1; then
  cat "$log" >&2
  echo "check-template: FAILED: sam build" >&2
  exit 1
fi
echo "check-template: build: ok in $(( $(date +%s) - start )) s -> .aws-sam/build"
for dir in .aws-sam/build/*/; do
  name=$(basename "$dir")
  size=$(du -sh "$dir" | cut -f1)
  if [ -d "$dir/python" ]; then
    echo "  $name: $size (layer: $(ls "$dir/python" | grep -vc -e '\.dist-info$' -e '^__pycache__$') top-level entries)"
  else
    echo "  $name: $size"
  fi
done

# 3. host-architecture build for the built-artefact tests.
case "$(uname -m)" in
  aarch64|arm64) host_arch=arm64 ;;
  x86_64|amd64) host_arch=x86_64 ;;
  *) host_arch="" ;;
esac
if [ "$host_build" = 1 ] && [ -n "$host_arch" ] && [ "$host_arch" != arm64 ]; then
  mkdir -p .aws-sam/host
  host_template=.aws-sam/host/template.yaml
  # Absolute code paths (the copy lives elsewhere), and the host's architecture.
  sed -e "s#CodeUri: functions/#CodeUri: $PWD/functions/#" \
      -e "s#ContentUri: shared/#ContentUri: $PWD/shared/#" \
      -e "s/\barm64\b/$host_arch/g" template.yaml > "$host_template"
  if grep -q 'arm64' "$host_template" || ! grep -q "BuildArchitecture: $host_arch" "$host_template"; then
    echo "check-template: FAILED: could not retarget the template to $host_arch" >&2
    exit 1
  fi
  start=$(date +%s)
  # Run from .aws-sam/host so this build keeps its own build.toml and dependency
  # cache (.aws-sam/host/.aws-sam/deps); sharing them would evict the arm64 build's.
  if ! (cd .aws-sam/host && bash ../../scripts/sam.sh build --template-file template.yaml \
      --build-dir build --cache-dir cache --cached --parallel) >"$log" 2>&1; then
    cat "$log" >&2
    echo "check-template: FAILED: sam build for $host_arch (the test build)" >&2
    exit 1
  fi
  echo "check-template: test build for $host_arch: ok in $(( $(date +%s) - start )) s -> .aws-sam/host/build"
fi
echo "check-template: OK"
