#!/usr/bin/env bash
# The demo, in two parts, each against an aggregator of its own on SQLite:
#   1. three emulated pairs of glasses speak the demo queries and real recorded clips through the real
#      pipeline, with local differential privacy on (epsilon 2 per signal, 20 signals a day); for each,
#      what its glasses heard (before noise), what they sent, and the profile the aggregator merged;
#   2. a text-only fleet of $SOTTO_DEMO_FLEET devices (300) with the same privacy, and the aggregator's
#      de-biased estimate of how often each interest came up, beside the truth and its 95% interval.
# Extra arguments go to the emulator of part 1 (the last flag wins: --ldp-epsilon 0 turns the noise off
# there). The reports stay in $SOTTO_DEMO_OUT (a new folder by default): the emulator's summaries as HTML
# with a plot, and the wearer's page of the first pair of glasses. SOTTO_DEMO_NO_SETUP=1 skips the
# environment set-up (the test suite runs the demo from its own, already installed, environment).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -n "${SOTTO_DEMO_NO_SETUP:-}" ] || bash "$ROOT/tools/bootstrap.sh" server,tools
PYBIN="${SOTTO_VENV:-$ROOT/.venv}/bin"
FLEET="${SOTTO_DEMO_FLEET:-300}"
PER_DEVICE="${SOTTO_DEMO_PER_DEVICE:-8}"
OUT="${SOTTO_DEMO_OUT:-$(mktemp -d -t sotto-demo-XXXXXX)}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
SERVERS=()
cleanup() {
  for pid in "${SERVERS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
cd "$ROOT"

# start_aggregator NAME [serve options]: an aggregator on $WORK/NAME.db; sets TARGET.
start_aggregator() {
  local name="$1"
  shift
  "$PYBIN/sotto-server" serve --db "sqlite:///$WORK/$name.db" --listen 127.0.0.1:0 "$@" \
    > "$WORK/$name.out" 2> "$WORK/$name.log" &
  SERVERS+=("$!")
  for _ in $(seq 100); do grep -q "listening on" "$WORK/$name.out" 2>/dev/null && break; sleep 0.1; done
  TARGET="$(sed -n 's/^listening on //p' "$WORK/$name.out")"
  [ -n "$TARGET" ] || { cat "$WORK/$name.log" >&2; exit 1; }
}

# Every call to the aggregator needs a credential: a token per pair of glasses, and one for the admin
# commands. Only their SHA-256 is stored; this is the one time they are printed.
issue_tokens() {
  local db="sqlite:///$WORK/$1.db"
  shift
  "$PYBIN/sotto-server" token issue --db "$db" "$@" > "$WORK/tokens-${db##*/}.json"
  "$PYBIN/sotto-server" token issue --db "$db" --admin > "$WORK/admin-${db##*/}.token"
}

echo "== Part 1: three pairs of glasses =="
issue_tokens demo emulated-device-0001 emulated-device-0002 emulated-device-0003
start_aggregator demo
echo "aggregator listening on $TARGET"
"$PYBIN/python" -m tools.emulate_device --target "$TARGET" --devices 3 \
  --token-file "$WORK/tokens-demo.db.json" --outbox-dir "$OUT/outboxes" \
  --ldp-epsilon 2 --daily-budget 20 \
  --report "$OUT/report.json" "$@"
"$PYBIN/python" -m tools.demo_explain profiles --report "$OUT/report.json" --target "$TARGET" \
  --admin-token-file "$WORK/admin-demo.db.token" --top 5
"$PYBIN/sotto-edge" ledger --outbox "$OUT/outboxes/emulated-device-0001.db" --html "$OUT/wearer.html" >/dev/null

echo
echo "== Part 2: a fleet of $FLEET pairs of glasses, $PER_DEVICE queries each, epsilon 2 =="
mapfile -t FLEET_IDS < <(for i in $(seq "$FLEET"); do printf 'fleet-device-%04d\n' "$i"; done)
issue_tokens fleet "${FLEET_IDS[@]}"
# k-anonymity is lowered to 2 here so that every estimate is printed, even for categories never heard;
# the default of 50 would answer "too small" for those.
start_aggregator fleet --min-audience 2
"$PYBIN/python" -m tools.emulate_device --target "$TARGET" --devices "$FLEET" --profile-prefix fleet \
  --text --no-clips --per-device "$PER_DEVICE" --token-file "$WORK/tokens-fleet.db.json" \
  --ldp-epsilon 2 --daily-budget 20 --report "$OUT/fleet.json" > "$WORK/fleet-summary.txt"
"$PYBIN/python" -m tools.demo_explain fleet --report "$OUT/fleet.json" --target "$TARGET" \
  --admin-token-file "$WORK/admin-fleet.db.token" --top 8

echo
echo "Reports in $OUT: report.html and fleet.html (the emulator's summaries, with plots), wearer.html"
echo "(what the first pair of glasses shows its wearer: sotto-edge ledger --html)."
