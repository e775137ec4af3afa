#!/usr/bin/env bash
# The two commands of the README:
#   bash dev.sh demo [options]   convert a torchvision ResNet-50, check it, report fusion and speed
#   bash dev.sh test [pytest args]   run the test-suite (Triton kernels via the interpreter on CPU)
# (and, for .ci/run: bash dev.sh setup   only the set-up below)
# Each sets up .venv first (once; again when requirements-dev.txt changes).
# FASTRES_SYSTEM_PYTHON=1 uses the current python instead (e.g. a GPU box with the stack preinstalled).
set -euo pipefail
cd "$(dirname "$0")"

setup() {
    if [ "${FASTRES_SYSTEM_PYTHON:-0}" = "1" ]; then
        PY=python3
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # fastres maps ./kernels itself
        return
    fi
    local venv=.venv
    local stamp="$venv/.deps-$(sha1sum requirements-dev.txt setup.py pyproject.toml | sha1sum | cut -c1-12)"
    if [ ! -f "$stamp" ]; then
        echo "[dev.sh] setting up $venv (first run: ~2 minutes)" >&2
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q --disable-pip-version-check -r requirements-dev.txt
        "$venv/bin/pip" install -q --disable-pip-version-check --no-deps -e .
        touch "$stamp"
    fi
    PY="$venv/bin/python"
}

cmd="${1:-}"
shift || true
case "$cmd" in
    setup) setup ;;
    demo) setup; exec "$PY" -m fastres demo "$@" ;;
    test) setup; exec "$PY" -m pytest -q "$@" ;;
    *) echo "usage: bash dev.sh demo [options] | bash dev.sh test [pytest args]" >&2; exit 2 ;;
esac
