#!/usr/bin/env bash
# Memory soak: flowbus bridges N messages (default 1,000,000) at full speed through the
# benchmark flow (subscribe, Rhai enrich, publish) on a private mosquitto, while its resident
# memory (VmRSS) is sampled every second. Reports RSS after warm-up (10 % of the run), at the
# end and at its highest, and the load generator's loss/duplicate/order counts.
#
#   benches/bridge/soak.sh [--qos 1] [--n 1000000] [--log-entries N] [--out DIR]
#
# --log-entries sets [activity_log] buffer_entries (default 1000 per ring): the per-message
# ring fills at ~22 sampled entries a second (~330 bytes each), a little RSS growth in the
# first minute.
#
# Writes DIR/rss.txt (seconds since start, VmRSS, RssAnon, RssFile in KiB), DIR/loadgen.json, DIR/summary.txt.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
QOS=1; N=1000000; OUT=""; ENTRIES=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --qos) QOS="$2"; shift 2 ;;
    --n) N="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --log-entries) ENTRIES="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "soak.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-$ROOT/target/bench-soak/qos$QOS-$(date +%H%M%S)}"
mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
FB=""; BROKER=""; SAMPLER=""
trap '[[ -n "$SAMPLER" ]] && kill $SAMPLER 2>/dev/null; [[ -n "$FB" ]] && kill $FB 2>/dev/null; [[ -n "$BROKER" ]] && kill $BROKER 2>/dev/null || true' EXIT
FLOWBUS_EXTRA=""; [[ -n "$ENTRIES" ]] && FLOWBUS_EXTRA="$(printf '[activity_log]\nbuffer_entries = %s\n' "$ENTRIES")"
# shellcheck source=single.sh
source "$HERE/single.sh"
START=$(date +%s.%N)
(
  while kill -0 "$FB" 2>/dev/null; do
    rss=$(awk '/^(VmRSS|RssAnon|RssFile):/{printf "%s ", $2}' "/proc/$FB/status" 2>/dev/null || true)
    [[ -n "$rss" ]] && awk -v now="$(date +%s.%N)" -v t0="$START" -v rss="$rss" 'BEGIN { printf "%.2f %s\n", now - t0, rss }'
    sleep 1
  done
) > "$OUT/rss.txt" &
SAMPLER=$!
"$BIN/loadgen" --url "tcp://127.0.0.1:$PORT" --qos "$QOS" --system flowbus --label soak \
  --n "$N" --secs 3600 --lat-n 0 --pid "$FB" > "$OUT/loadgen.json"
sleep 2
kill "$SAMPLER" 2>/dev/null || true; SAMPLER=""
python3 - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
out = sys.argv[1]
lg = json.load(open(f"{out}/loadgen.json"))
t = lg["throughput"]
rows = [tuple(float(x) for x in l.split()) for l in open(f"{out}/rss.txt") if len(l.split()) == 4]
# The run: from the first to the last sample while messages flowed.
first, last = rows[0][0], rows[-1][0]
span = t["elapsed_s"] or (last - first)
def at(frac):
    when = first + 1 + frac * span
    return min(rows, key=lambda r: abs(r[0] - when))[1:]
(warm, warm_anon, _), (end, end_anon, end_file) = at(0.10), at(1.0)
high = max(r[1] for r in rows if r[0] >= first + 1 + 0.10 * span)
print(f"messages: {t['received']} received of {t['sent']} sent at QoS {lg['qos']} "
      f"({t['received'] / span:,.0f} msg/s over {span:.0f} s); "
      f"lost {t['lost']}, duplicates {t['dups']}, order violations {t['order_violations']}")
print(f"RSS: after warm-up (10 %) {warm / 1024:.1f} MiB, at the end {end / 1024:.1f} MiB, "
      f"highest after warm-up {high / 1024:.1f} MiB; end vs warm-up {100 * (end - warm) / warm:+.1f} %, "
      f"highest vs warm-up {100 * (high - warm) / warm:+.1f} %")
print(f"of which heap and stacks (RssAnon) {warm_anon / 1024:.1f} -> {end_anon / 1024:.1f} MiB "
      f"({100 * (end_anon - warm_anon) / warm_anon:+.1f} %), mapped files (RssFile) {end_file / 1024:.1f} MiB at the end")
print("RSS at each tenth of the run (MiB): " +
      " ".join(f"{at(f / 10)[0] / 1024:.1f}" for f in range(0, 11)))
print("RssAnon at each tenth of the run (MiB): " +
      " ".join(f"{at(f / 10)[1] / 1024:.1f}" for f in range(0, 11)))
EOF
