#!/usr/bin/env bash
# The test command: set up (including a PostgreSQL server), check the wire contract, lint, type-check,
# run every test.
#   bash tools/test.sh            # everything
#   bash tools/test.sh -k edge    # extra arguments go to pytest
# The PostgreSQL tests use $SOTTO_TEST_POSTGRES_URL when it is set, else the server tools/postgres.sh
# starts; they fail (never skip) when there is none.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/bootstrap.sh" server,postgres,tools,dev
if [ -z "${SOTTO_TEST_POSTGRES_URL:-}" ]; then
  SOTTO_TEST_POSTGRES_URL="$(bash "$ROOT/tools/postgres.sh")"
  export SOTTO_TEST_POSTGRES_URL
fi
PYBIN="${SOTTO_VENV:-$ROOT/.venv}/bin"
cd "$ROOT"
"$PYBIN/python" tools/gen_proto.py --check
"$PYBIN/ruff" check .
"$PYBIN/ruff" format --check .
"$PYBIN/mypy" edge server tools
"$PYBIN/python" -m pytest "$@"
