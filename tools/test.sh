#!/usr/bin/env bash
# The test command: set up, check the wire contract, lint, type-check, run every test.
#   bash tools/test.sh            # everything
#   bash tools/test.sh -k edge    # extra arguments go to pytest
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/bootstrap.sh" server,tools,dev
PYBIN="${SOTTO_VENV:-$ROOT/.venv}/bin"
cd "$ROOT"
"$PYBIN/python" tools/gen_proto.py --check
"$PYBIN/ruff" check .
"$PYBIN/ruff" format --check .
"$PYBIN/mypy" edge server tools
"$PYBIN/python" -m pytest "$@"
