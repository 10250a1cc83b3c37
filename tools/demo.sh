#!/usr/bin/env bash
# The demo: an aggregator on SQLite, three emulated pairs of glasses speaking the demo queries and
# real recorded clips through the real pipeline, then the profiles the aggregator merged.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/bootstrap.sh" server,tools
PYBIN="${SOTTO_VENV:-$ROOT/.venv}/bin"
WORK="$(mktemp -d)"
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; rm -rf "$WORK"' EXIT

cd "$ROOT"
DB="sqlite:///$WORK/demo.db"
DEVICES=(emulated-device-0001 emulated-device-0002 emulated-device-0003)
# Every call to the aggregator needs a credential: a token per pair of glasses, and one for the admin
# commands. Only their SHA-256 is stored; this is the one time they are printed.
"$PYBIN/sotto-server" token issue --db "$DB" "${DEVICES[@]}" > "$WORK/tokens.json"
"$PYBIN/sotto-server" token issue --db "$DB" --admin > "$WORK/admin.token"

"$PYBIN/sotto-server" serve --db "$DB" --listen 127.0.0.1:0 > "$WORK/server.out" 2> "$WORK/server.log" &
SERVER=$!
for _ in $(seq 100); do grep -q "listening on" "$WORK/server.out" 2>/dev/null && break; sleep 0.1; done
TARGET="$(sed -n 's/^listening on //p' "$WORK/server.out")"
[ -n "$TARGET" ] || { cat "$WORK/server.log" >&2; exit 1; }
echo "aggregator listening on $TARGET (SQLite: $WORK/demo.db)"

# Local differential privacy is on in the demo (epsilon 2 per signal, 20 signals a day); pass
# --ldp-epsilon 0 to turn it off, or another epsilon: the last flag wins.
"$PYBIN/python" -m tools.emulate_device --target "$TARGET" --devices 3 --token-file "$WORK/tokens.json" \
  --ldp-epsilon 2 --daily-budget 20 \
  --report "$WORK/report.json" "$@"

for device in "${DEVICES[@]}"; do
  echo
  echo "profile $device:"
  "$PYBIN/sotto-server" profile --target "$TARGET" --admin-token-file "$WORK/admin.token" --top-k 5 "$device" || true
done
