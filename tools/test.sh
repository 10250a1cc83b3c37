#!/usr/bin/env bash
# The test command: set up (including a PostgreSQL server), check the wire contract, lint, type-check,
# run every test.
#   bash tools/test.sh            # everything
#   bash tools/test.sh -k edge    # extra arguments go to pytest
# The PostgreSQL tests use $SOTTO_TEST_POSTGRES_URL when it is set, else the server tools/postgres.sh
# starts; the sharded-store tests use $SOTTO_TEST_PLPROXY_URL, $SOTTO_TEST_SHARD_URLS and
# $SOTTO_TEST_SHARD_CLUSTERS, else the clusters tools/plproxy.sh creates. They fail (never skip) when
# there is none.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/bootstrap.sh" server,postgres,tools,dev,tflite
if [ -z "${SOTTO_TEST_POSTGRES_URL:-}" ]; then
  SOTTO_TEST_POSTGRES_URL="$(bash "$ROOT/tools/postgres.sh")"
  export SOTTO_TEST_POSTGRES_URL
fi
# The sharded store (PL/Proxy): a proxy database and two more PostgreSQL clusters holding the partitions.
if [ -z "${SOTTO_TEST_PLPROXY_URL:-}" ]; then
  plproxy_env="$(bash "$ROOT/tools/plproxy.sh")"
  while IFS='=' read -r name value; do
    value="${value#\'}"
    export "$name=${value%\'}"
  done <<<"$plproxy_env"
fi
PYBIN="${SOTTO_VENV:-$ROOT/.venv}/bin"
# The TFLite fallback runtime, tflite-runtime 2.14, needs numpy < 2: it gets a small environment of its
# own (numpy, tokenizers, tflite-runtime, and the project without its dependencies) that
# tests/edge/test_edge_classifier_parity.py runs the edge classifier in.
if [ -z "${SOTTO_TFLITE_RUNTIME_PYTHON:-}" ]; then
  TFLRT="${SOTTO_TFLITE_RUNTIME_VENV:-$ROOT/.venv-tflite-runtime}"
  [ -x "$TFLRT/bin/python" ] || "$(readlink -f "$PYBIN/python")" -m venv "$TFLRT"
  "$TFLRT/bin/python" -m pip install --quiet "tflite-runtime==2.14.0" "numpy>=1.26,<2" "tokenizers>=0.20"
  "$TFLRT/bin/python" -m pip install --quiet --no-deps -e "$ROOT" --config-settings editable_mode=strict
  export SOTTO_TFLITE_RUNTIME_PYTHON="$TFLRT/bin/python"
fi
cd "$ROOT"
"$PYBIN/python" -m tools.gen_proto --check
"$PYBIN/ruff" check .
"$PYBIN/ruff" format --check .
"$PYBIN/mypy" -p sotto -p tools
"$PYBIN/lint-imports"  # the layering contracts in pyproject.toml
"$PYBIN/python" -m pytest "$@"
