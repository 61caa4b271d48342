#!/usr/bin/env bash
# Instructions per message of the engine path, counted by valgrind's callgrind: repeatable on
# a shared machine where wall-clock microbenchmarks are not. Runs examples/engine_count.rs at
# N1 and N2 repetitions and prints (Ir(N2) - Ir(N1)) / (N2 - N1), so set-up cancels out.
#
#   benches/bridge/count.sh [--n1 200] [--n2 1200]        (make bench-count)
#
# With --daemon QOS: the whole flowbus process instead (every thread, paho's included), bridging
# the benchmark flow on a private mosquitto; N1 and N2 messages (defaults 600 and 2400) sent at
# 300 msg/s by the load generator, flowbus under callgrind, stopped with SIGTERM after each run.
# Kernel time is not counted: compare builds with it, not systems. --flowbus PATH picks the
# binary (default target/release/flowbus, built first).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
N1=""; N2=""; DAEMON_QOS=""; FB_BIN=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --n1) N1="$2"; shift 2 ;;
    --n2) N2="$2"; shift 2 ;;
    --daemon) DAEMON_QOS="$2"; shift 2 ;;
    --flowbus) FB_BIN="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "count.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
command -v valgrind >/dev/null || { echo "count.sh: needs valgrind (apt-get install valgrind)" >&2; exit 1; }
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT

if [[ -n "$DAEMON_QOS" ]]; then
  # shellcheck source=flow.sh
  source "$HERE/flow.sh"
  N1=${N1:-600}; N2=${N2:-2400}
  [[ -n "$FB_BIN" ]] && FB_BIN=$(realpath "$FB_BIN")
  if [[ -z "$FB_BIN" ]]; then
    (cd "$ROOT" && cargo build --release --bin flowbus) >&2
    FB_BIN="$ROOT/target/release/flowbus"
  fi
  (cd "$HERE" && cargo build --release --bin loadgen) >&2
  daemon_ir() { # n -> total instructions of flowbus bridging n messages
    local dir="$TMP/run.$1" port broker sut
    mkdir -p "$dir"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest none\nset_tcp_nodelay true\n' "$port" > "$dir/mosquitto.conf"
    mosquitto -c "$dir/mosquitto.conf" & broker=$!
    sleep 0.3
    flowbus_flow "$dir" "$port" "$DAEMON_QOS" 1
    (cd "$dir" && RUST_LOG=warn exec valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" "$FB_BIN" run --config "$dir/flowbus.toml") >"$dir/flowbus.log" 2>&1 & sut=$!
    "$ROOT/target/bench/release/loadgen" --url "tcp://127.0.0.1:$port" --qos "$DAEMON_QOS" --n 0 \
      --lat-n "$1" --rate 300 --ready-timeout 120 > "$dir/loadgen.json" 2>/dev/null
    kill -TERM "$sut"; wait "$sut" || true
    kill "$broker"; wait "$broker" 2>/dev/null || true
    python3 -c 'import json,sys; l=json.load(open(sys.argv[1]))["latency"]; sys.exit(l["received"] != int(sys.argv[2]) or l["dups"] or l["lost"])' \
      "$dir/loadgen.json" "$1" || { echo "count.sh: the run with $1 messages lost or duplicated some" >&2; exit 1; }
    grep -h '^summary:' "$dir"/cg.out* | awk '{s += $2} END {print s}'
  }
  a=$(daemon_ir "$N1"); b=$(daemon_ir "$N2")
  echo "daemon qos$DAEMON_QOS: $(( (b - a) / (N2 - N1) )) instructions per message"
  exit 0
fi

N1=${N1:-200}; N2=${N2:-1200}
(cd "$HERE" && cargo build --release --example engine_count) >&2
BIN="$HERE/../../target/bench/release/examples/engine_count"
ir() { # step n -> total instructions
  valgrind --tool=callgrind --callgrind-out-file="$TMP/cg.$1.$2" "$BIN" "$1" "$2" >/dev/null 2>&1
  grep '^summary:' "$TMP/cg.$1.$2" | awk '{print $2}'
}
for step in script all; do
  a=$(ir "$step" "$N1"); b=$(ir "$step" "$N2")
  echo "$step: $(( (b - a) / (N2 - N1) )) instructions per message"
done
