#!/usr/bin/env bash
# Profiles flowbus running the benchmark bridge under load: a private mosquitto
# (set_tcp_nodelay true), `flowbus run` with the bench flow, the load generator at full speed,
# and `perf record` (cpu-clock sampling with DWARF call graphs; works without hardware counters)
# on the flowbus process. Falls back to valgrind callgrind when perf is missing.
#
#   benches/bridge/profile.sh [--qos 1] [--n 30000] [--secs 15] [--in-flight N] [--out DIR]
#
# Writes DIR/perf.data, DIR/self.txt (self time by function), DIR/children.txt (inclusive),
# DIR/loadgen.json. Read with: perf report -i DIR/perf.data --no-children
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
QOS=1; N=30000; SECS=15; INFLIGHT=""; OUT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --qos) QOS="$2"; shift 2 ;;
    --n) N="$2"; shift 2 ;;
    --secs) SECS="$2"; shift 2 ;;
    --in-flight) INFLIGHT="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "profile.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-$ROOT/target/bench-profile/qos$QOS-$(date +%H%M%S)}"
mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
FB=""; BROKER=""
trap '[[ -n "$FB" ]] && kill $FB 2>/dev/null; [[ -n "$BROKER" ]] && kill $BROKER 2>/dev/null || true' EXIT
IN_FLIGHT="$INFLIGHT"
# shellcheck source=single.sh
source "$HERE/single.sh"

if command -v perf >/dev/null && perf record -e cpu-clock -o /dev/null -- true >/dev/null 2>&1; then
  # Start sampling once the flow is up (the load generator waits for a probe to come back).
  sleep 1
  perf record -e cpu-clock -F 2000 --call-graph dwarf,32768 -p "$FB" -o "$OUT/perf.data" >"$OUT/perf.log" 2>&1 &
  PERF=$!
  "$BIN/loadgen" --url "tcp://127.0.0.1:$PORT" --qos "$QOS" --system flowbus --label profile \
    --n "$N" --secs "$SECS" --lat-n 0 --pid "$FB" > "$OUT/loadgen.json"
  kill -INT "$PERF"; wait "$PERF" || true
  perf report -i "$OUT/perf.data" --no-children --sort symbol --stdio --percent-limit 0.5 2>/dev/null | grep -v '^$' > "$OUT/self.txt" || true
  perf report -i "$OUT/perf.data" --children --sort symbol --stdio -g none --percent-limit 2 2>/dev/null | grep -v '^$' > "$OUT/children.txt" || true
  perf report -i "$OUT/perf.data" --no-children --sort dso --stdio 2>/dev/null | grep -v '^$' > "$OUT/dso.txt" || true
else
  echo "perf unavailable; using valgrind callgrind (slow: a short run)" >&2
  kill "$FB"; wait "$FB" 2>/dev/null || true
  (cd "$OUT" && RUST_LOG=warn exec valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" "$ROOT/target/release/flowbus" run --config "$OUT/flowbus.toml") >"$OUT/flowbus.log" 2>&1 &
  FB=$!
  "$BIN/loadgen" --url "tcp://127.0.0.1:$PORT" --qos "$QOS" --system flowbus --label profile \
    --n 2000 --secs 60 --lat-n 0 --ready-timeout 120 > "$OUT/loadgen.json"
  kill "$FB"; wait "$FB" 2>/dev/null || true; FB=""
  callgrind_annotate "$OUT/callgrind.out" > "$OUT/self.txt" 2>/dev/null || true
fi
echo "profile in $OUT" >&2
head -60 "$OUT/self.txt"
