#!/usr/bin/env bash
# CPU per message of each thread of one system under test, for A/B comparisons of two
# flowbus builds (interleave the runs: single runs on a shared VM swing by ±10-15 %).
# Starts a private mosquitto (set_tcp_nodelay true), the system, and the load generator;
# reads utime+stime of every thread from /proc before and after.
#
#   benches/bridge/threads.sh [--system flowbus|bridge-pipelined] [--qos 1] [--n 20000]
#                             [--rate R] [--flowbus PATH] [--capture]
#
# Without --rate: closed loop at full speed (the throughput phase). With --rate R: N messages
# at R msg/s (the latency phase), where nothing batches. --flowbus picks the binary (default
# target/release/flowbus; build the other side of an A/B with its own CARGO_TARGET_DIR).
# FLOWBUS_EXTRA (environment): more flowbus.toml, e.g. $'[daemon]\nworker_threads = 1'.
# Prints one line (rate, loss, latency with --rate, CPU per message of the system, load
# generator and broker) and one line per thread group (from /proc's 10 ms ticks; with --rate these include the 1,000
# messages of the short throughput phase that comes first). With --rate, also the messages
# slower than the p99 grouped into runs of consecutive sequence numbers (a stall of the system
# delays a run of them; scheduling noise scattered ones).
# --capture (needs tcpdump, and root): records the broker's loopback traffic and prints, per
# message, how long each leg took (stages.py): producer → broker → system, the system's own
# time from receipt (QoS 2: from the broker's PUBREL) to its PUBLISH on the wire, broker →
# consumer, and the publisher's PUBREC → PUBREL. Use it with --rate.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
# shellcheck source=flow.sh
source "$HERE/flow.sh"
SYS=flowbus; QOS=1; N=20000; RATE=""; FB_BIN="$ROOT/target/release/flowbus"; CAPTURE=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --system) SYS="$2"; shift 2 ;;
    --qos) QOS="$2"; shift 2 ;;
    --n) N="$2"; shift 2 ;;
    --rate) RATE="$2"; shift 2 ;;
    --flowbus) FB_BIN="$2"; shift 2 ;;
    --capture) CAPTURE=1; shift ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "threads.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
BIN="$ROOT/target/bench/release"
[[ -x "$BIN/loadgen" ]] || (cd "$HERE" && cargo build --release --bins >&2)
mkdir -p "$ROOT/target/bench-threads"
OUT=$(mktemp -d "$ROOT/target/bench-threads/run.XXXX")
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest none\nset_tcp_nodelay true\nmax_queued_messages 10000\n' "$PORT" > "$OUT/mosquitto.conf"
chmod -R a+rwx "$OUT"
mosquitto -c "$OUT/mosquitto.conf" & BROKER=$!
SUT=""; TCPDUMP=""
trap 'kill $SUT $BROKER $TCPDUMP 2>/dev/null || true' EXIT
sleep 0.3
case "$SYS" in
  flowbus)
    flowbus_flow "$OUT" "$PORT" "$QOS" 1
    printf '%s' "${FLOWBUS_EXTRA:-}" >> "$OUT/flowbus.toml"
    (cd "$OUT" && RUST_LOG=warn exec "$FB_BIN" run --config "$OUT/flowbus.toml") >"$OUT/flowbus.log" 2>&1 &
    SUT=$! ;;
  bridge-pipelined)
    "$BIN/bridge" --url "tcp://127.0.0.1:$PORT" --qos "$QOS" --mode pipelined >"$OUT/sut.log" 2>&1 &
    SUT=$! ;;
  *) echo "threads.sh: --system flowbus or bridge-pipelined" >&2; exit 2 ;;
esac
sleep 1.5
snap() {
  for t in /proc/$SUT/task/*; do
    echo "$(tr ' ' _ < "$t/comm") $(awk '{print $14+$15}' "$t/stat")"
  done | awk '{a[$1]+=$2} END {for (k in a) print k, a[k]}' | sort
}
if ((CAPTURE)); then
  command -v tcpdump >/dev/null || { echo "threads.sh: --capture needs tcpdump" >&2; exit 1; }
  tcpdump -i lo -s 0 -w "$OUT/capture.pcap" "tcp port $PORT" >/dev/null 2>&1 & TCPDUMP=$!
  sleep 1
fi
snap > "$OUT/before"
if [[ -n "$RATE" ]]; then
  PHASE=(--n 1000 --lat-n "$N" --rate "$RATE"); KEY=latency
else
  PHASE=(--n "$N" --lat-n 0); KEY=throughput
fi
"$BIN/loadgen" --url "tcp://127.0.0.1:$PORT" --qos "$QOS" --system "$SYS" --label threads \
  --secs 20 "${PHASE[@]}" --pid "$SUT" > "$OUT/loadgen.json" 2>"$OUT/loadgen.log"
snap > "$OUT/after"
python3 - "$OUT" "$N" "$KEY" <<'PY'
import json, sys
out, n, key = sys.argv[1], int(sys.argv[2]), sys.argv[3]
before = dict(l.split() for l in open(out + "/before"))
after = dict(l.split() for l in open(out + "/after"))
j = json.load(open(out + "/loadgen.json"))
t = j[key]
cpu = j["sut"]["cpu_s_latency" if key == "latency" else "cpu_s"]
lat = f" p50 {t['p50_ms']:.3f} p99 {t['p99_ms']:.3f} max {t['max_ms']:.2f} ms" if key == "latency" else ""
print(f"rate {t['rate']:.0f} recv {t['received']} lost {t['lost']} dup {t['dups']} "
      f"order {t['order_violations']}{lat} | system {cpu * 1e6 / t['received']:.1f} us/msg, "
      f"ctx {j['sut']['ctx_switches_per_msg']}/msg, peak RSS {j['sut']['peak_rss_kib']} KiB | loadgen "
      f"{j['loadgen_cpu_s'] * 1e6 / t['received']:.1f} us/msg | others "
      f"{j['other_cpu_s'] * 1e6 / t['received']:.1f} us/msg")
if key == "latency" and t.get("slower_than_p99"):
    # Group the slow messages into runs of consecutive sequence numbers: one long run is one
    # stall of the system, many runs of one or two are scheduling noise.
    runs = []
    for seq, ms in t["slower_than_p99"]:
        if runs and seq <= runs[-1][1] + 2:
            runs[-1][1] = seq
            runs[-1][2] = max(runs[-1][2], ms)
        else:
            runs.append([seq, seq, ms])
    print(f"  slower than p99: {len(t['slower_than_p99'])} messages in {len(runs)} run(s): "
          + ", ".join(f"{a}-{b} ({m:.1f} ms)" if a != b else f"{a} ({m:.1f} ms)" for a, b, m in runs[:12]))
# /proc ticks are 10 ms: ticks * 1e4 / n = us per message.
for k in sorted(after):
    d = (int(after[k]) - int(before.get(k, 0))) * 1e4 / n
    if d > 0.05:
        print(f"  {k:20s} {d:6.1f} us/msg")
PY
if ((CAPTURE)); then
  sleep 0.5; kill "$TCPDUMP"; wait "$TCPDUMP" 2>/dev/null || true; TCPDUMP=""
  python3 "$HERE/stages.py" "$OUT/capture.pcap" "$PORT"
fi
rm -rf "$OUT"
