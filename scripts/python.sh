#!/usr/bin/env bash
# Prints the interpreter to build the venv with: the Lambda runtime's python3.13
# when it exists (on PATH or in pyenv), else the newest Python 3.11+ found.
set -euo pipefail
want=3.13
candidates=(python3.13)
if command -v pyenv >/dev/null 2>&1; then
  root=$(pyenv root)
  for v in $(ls -1 "$root/versions" 2>/dev/null | sort -rV); do
    candidates+=("$root/versions/$v/bin/python3")
  done
fi
candidates+=(python3.12 python3.11 python3)
best=""; best_ver=""
for c in "${candidates[@]}"; do
  p=$(command -v "$c" 2>/dev/null) || continue
  ver=$("$p" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || continue
  if [ "$ver" = "$want" ]; then echo "$p"; exit 0; fi
  case "$ver" in 3.1[1-9]) ;; *) continue ;; esac
  if [ -z "$best_ver" ] || [ "$(printf '%s\n%s\n' "$best_ver" "$ver" | sort -V | tail -1)" = "$ver" ] && [ "$ver" != "$best_ver" ]; then
    best=$p; best_ver=$ver
  fi
done
if [ -n "$best" ]; then
  echo "warning: python$want (the Lambda runtime) not found; using Python $best_ver at $best" >&2
  echo "$best"; exit 0
fi
echo "error: no Python 3.11+ found; install python3.13 (the Lambda runtime)" >&2
exit 1
