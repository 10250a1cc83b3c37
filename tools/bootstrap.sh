#!/usr/bin/env bash
# Set up a local environment: OS packages (when root), a Python 3.11 virtualenv in .venv, and the
# project with the extras given as arguments. Run by tools/test.sh and tools/demo.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SOTTO_VENV:-$ROOT/.venv}"
EXTRAS="${1:-server,postgres,tools,dev}"

need_os=()
command -v espeak-ng >/dev/null 2>&1 || need_os+=(espeak-ng)
# The postgres extra is for tests against a real PostgreSQL server (tools/postgres.sh starts it).
if [[ ",$EXTRAS," == *",postgres,"* ]] && ! command -v pg_ctlcluster >/dev/null 2>&1; then
  need_os+=(postgresql)
fi
# The dev extra is for the test suite: it opens the pages Sotto writes in headless Chromium and checks the
# operator's Prometheus rules with promtool; both must be there (the tests fail, never skip, without them).
if [[ ",$EXTRAS," == *",dev,"* ]]; then
  command -v chromium >/dev/null 2>&1 || need_os+=(chromium)
  command -v promtool >/dev/null 2>&1 || need_os+=(prometheus)
fi
if [ ${#need_os[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing OS packages: ${need_os[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_os[@]}" >/dev/null
  else
    echo "missing OS packages: ${need_os[*]} (install them with your package manager, e.g. apt-get install ${need_os[*]})" >&2
    exit 1
  fi
fi

PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required, found %d.%d" % sys.version_info[:2])'
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# Strict editable mode: a tree of links under build/ mirrors the installed layout (sotto.edge -> edge/, ...),
# so that mypy and every other static tool see the same packages as Python. A new module needs a re-run.
rm -rf "$ROOT"/build/__editable__.*  # a stale link tree would hide new files
"$VENV/bin/python" -m pip install --quiet -e "$ROOT[$EXTRAS]" --config-settings editable_mode=strict
