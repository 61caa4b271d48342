#!/usr/bin/env bash
# The flowbus bridge benchmark: the same bridge (subscribe bench/in/#, parse JSON, add a field,
# publish bench/out/... at the same QoS) run by several systems side by side on a private
# mosquitto on loopback, measured by the same load generator. See README.md beside this file
# and docs/PERFORMANCE.md.
#
#   benches/bridge/run.sh                      # full run (~12 min on 2 idle cores, ~15 with --nodered)
#   benches/bridge/run.sh --nodered            # also Node-RED 4 (installed from npm into a scratch dir)
#   benches/bridge/run.sh --quick              # 1 repetition, smaller N, nodelay table only (~3 min)
#   benches/bridge/run.sh --systems "flowbus bridge-pipelined" --qos "1" --reps 5
#   benches/bridge/run.sh --burst              # only the open-loop burst pass (both broker configs)
#   benches/bridge/run.sh --with-burst         # the closed-loop passes, then the burst pass (make bench)
#
# Output: target/bench-results/<time>/{results.jsonl,report.md,logs/}; report.md is printed.
set -euo pipefail

ORIG_ARGS=("$@")
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=flow.sh
source "$HERE/flow.sh"
ROOT="$(cd "$HERE/../.." && pwd)"

REPS=3
QOS="0 1 2"
SYSTEMS="broker bridge-wait bridge-pipelined flowbus flowbus-x4"
NODERED=0
NAGLE_TABLE=1          # also one repetition against mosquitto's default (set_tcp_nodelay false)
N=20000                # throughput phase: messages (sending stops after SECS)
SECS=6
WINDOW=500             # throughput phase: most messages between send and receive
LAT_N=3000             # latency phase: messages at RATE msg/s
RATE=1000
INSTANCES_X=4          # the "more instances" flowbus variant
QUIET_WAIT=${BENCH_QUIET_WAIT:-60}          # wait up to this many seconds for the machine to be idle before a run
OUT=""
BUILD=1
MAIN_TABLE=1
QUICKACK=0
IN_NETNS=0
SYSTEMS_SET=0
BURST=0                # 1: also the open-loop burst pass; --burst alone skips the closed-loop ones
BURST_SYSTEMS="flowbus bridge-pipelined bridge-wait"   # unless --systems names others
BURST_N=""             # messages per burst (empty: 100000 at QoS 0, 50000 at QoS 1, 20000 at QoS 2)
BURST_QUIET=3          # a burst ends when nothing arrived for this many seconds ...
BURST_SECS=120         # ... or this many seconds after its first send
BROKERS="unlimited default"   # broker configurations of the burst pass

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; cat <<EOF
Options:
  --reps N           repetitions of the main table (default $REPS)
  --qos "0 1 2"      QoS levels (default "$QOS")
  --systems "..."    from: broker bridge-wait bridge-pipelined flowbus flowbus-x4 flowbus-inflight
                     flowbus-memory (server persistence = "memory") nodered
                     (default "$SYSTEMS"; --nodered appends nodered)
  --nodered          add Node-RED 4 (npm install into target/bench-nodered)
  --no-nagle-table   skip the table against mosquitto's default socket settings
  --default-only     only the table against mosquitto's default (with --reps repetitions)
  --quickack         run everything in a private network namespace whose loopback routes
                     carry 'quickack 1' (no delayed ACKs: the client-side cure for Nagle
                     stalls); needs root (unshare, ip). Labels get a '-quickack' suffix
  --n N --secs S     throughput phase size and time cap (default $N, $SECS s)
  --lat-n N --rate R latency phase (default $LAT_N messages at $RATE msg/s)
  --window W         end-to-end window of the throughput phase (default $WINDOW)
  --quick            --reps 1 --n 10000 --lat-n 2000 --no-nagle-table
  --out DIR          results directory (default target/bench-results/<time>)
  --no-build         use the binaries already built
  --flowbus PATH     the flowbus binary to measure (default target/release/flowbus, built
                     unless --no-build; with PATH, flowbus is not built)
Burst pass (open loop; nodelay broker; see README.md):
  --burst            only the burst pass (systems default "$BURST_SYSTEMS")
  --with-burst       the closed-loop passes, then the burst pass
  --brokers "..."    burst broker configurations (default "$BROKERS"):
                     unlimited (max_inflight_messages 0, max_queued_messages 0) and
                     default (mosquitto's: 20 in flight, 1,000 queued per client)
  --burst-n N        messages per burst (default 100000 / 50000 / 20000 at QoS 0 / 1 / 2)
  --quiet-secs S     a burst ends when nothing arrived for S s (default $BURST_QUIET) ...
  --burst-secs S     ... or S s after its first send (default $BURST_SECS)
EOF
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --reps) REPS="$2"; shift 2 ;;
    --qos) QOS="$2"; shift 2 ;;
    --systems) SYSTEMS="$2"; SYSTEMS_SET=1; shift 2 ;;
    --nodered) NODERED=1; shift ;;
    --no-nagle-table) NAGLE_TABLE=0; shift ;;
    --n) N="$2"; shift 2 ;;
    --secs) SECS="$2"; shift 2 ;;
    --lat-n) LAT_N="$2"; shift 2 ;;
    --rate) RATE="$2"; shift 2 ;;
    --window) WINDOW="$2"; shift 2 ;;
    --quick) REPS=1; N=10000; LAT_N=2000; NAGLE_TABLE=0; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --default-only) MAIN_TABLE=0; NAGLE_TABLE=1; shift ;;
    --quickack) QUICKACK=1; shift ;;
    --flowbus) FLOWBUS_ARG="$2"; shift 2 ;;
    --burst) BURST=1; MAIN_TABLE=0; NAGLE_TABLE=0; shift ;;
    --with-burst) BURST=1; shift ;;
    --brokers) BROKERS="$2"; shift 2 ;;
    --burst-n) BURST_N="$2"; shift 2 ;;
    --quiet-secs) BURST_QUIET="$2"; shift 2 ;;
    --burst-secs) BURST_SECS="$2"; shift 2 ;;
    --in-netns) IN_NETNS=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done
if [[ $QUICKACK == 1 && $IN_NETNS == 0 ]]; then
  command -v unshare >/dev/null && command -v ip >/dev/null || { echo "run.sh: --quickack needs unshare and ip (iproute2)" >&2; exit 1; }
  # Same arguments, inside a new network namespace (its own loopback).
  exec unshare -n -- "$0" "${ORIG_ARGS[@]}" --in-netns
fi
if [[ $IN_NETNS == 1 ]]; then
  ip link set lo up
  if [[ $QUICKACK == 1 ]]; then
    # Delayed ACKs off for every loopback connection: route attribute quickack.
    ip route change local 127.0.0.0/8 dev lo table local proto kernel scope host src 127.0.0.1 quickack 1
    ip route change local 127.0.0.1 dev lo table local proto kernel scope host src 127.0.0.1 quickack 1
  fi
fi
SUFFIX=""; [[ $QUICKACK == 1 ]] && SUFFIX="-quickack"
[[ $SYSTEMS_SET == 1 ]] && BURST_SYSTEMS="$SYSTEMS"
if [[ $NODERED == 1 && " $SYSTEMS " != *" nodered "* ]]; then SYSTEMS="$SYSTEMS nodered"; fi
if [[ $NODERED == 1 && " $BURST_SYSTEMS " != *" nodered "* ]]; then BURST_SYSTEMS="$BURST_SYSTEMS nodered"; fi
for b in $BROKERS; do [[ $b == unlimited || $b == default ]] || { echo "run.sh: --brokers takes unlimited and default, not '$b'" >&2; exit 2; }; done
# The systems any pass will run.
ALL_SYSTEMS=""
[[ $MAIN_TABLE == 1 || $NAGLE_TABLE == 1 ]] && ALL_SYSTEMS="$SYSTEMS"
[[ $BURST == 1 ]] && ALL_SYSTEMS="$ALL_SYSTEMS $BURST_SYSTEMS"

OUT="${OUT:-$ROOT/target/bench-results/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT/logs"; OUT="$(cd "$OUT" && pwd)"   # absolute: the systems run in their own directories
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
BIN="$ROOT/target/bench/release"
FLOWBUS="$ROOT/target/release/flowbus"
BUILD_FLOWBUS=$BUILD
if [[ -n "${FLOWBUS_ARG:-}" ]]; then
  [[ -x "$FLOWBUS_ARG" ]] || { echo "run.sh: --flowbus $FLOWBUS_ARG: not an executable" >&2; exit 2; }
  FLOWBUS="$(cd "$(dirname "$FLOWBUS_ARG")" && pwd)/$(basename "$FLOWBUS_ARG")"
  BUILD_FLOWBUS=0
fi
NR_DIR="$ROOT/target/bench-nodered"

say() { echo "[bench $(date +%H:%M:%S)] $*" >&2; }
die() { echo "run.sh: error: $*" >&2; exit 1; }

command -v mosquitto >/dev/null || die "mosquitto is not installed (apt-get install mosquitto)"

if [[ $BUILD_FLOWBUS == 1 ]]; then
  say "building flowbus (release)"
  (cd "$ROOT" && cargo build --release --bin flowbus) >"$OUT/logs/build.log" 2>&1 || { tail -20 "$OUT/logs/build.log" >&2; die "cargo build of flowbus failed"; }
fi
if [[ $BUILD == 1 ]]; then
  say "building the load generator and bridges (release)"
  (cd "$HERE" && cargo build --release --bins) >>"$OUT/logs/build.log" 2>&1 || { tail -20 "$OUT/logs/build.log" >&2; die "cargo build of benches/bridge failed"; }
fi
[[ -x "$BIN/loadgen" && -x "$BIN/bridge" ]] || die "no load generator in $BIN (run without --no-build)"
if [[ " $ALL_SYSTEMS " == *" flowbus"* ]]; then
  [[ -x "$FLOWBUS" ]] || die "no flowbus binary at $FLOWBUS (run without --no-build, or --flowbus PATH)"
fi

# ---- Node-RED (only when asked for) ----------------------------------------------------
if [[ " $ALL_SYSTEMS " == *" nodered "* ]]; then
  command -v node >/dev/null && command -v npm >/dev/null || die "Node-RED needs node and npm (apt-get install nodejs npm)"
  if [[ ! -f "$NR_DIR/node_modules/node-red/red.js" ]]; then
    NR_VERSION="$(npm view 'node-red@4' version 2>/dev/null | tail -1 | sed "s/.*'\(.*\)'.*/\1/")" || true
    [[ -n "$NR_VERSION" ]] || die "npm cannot see node-red@4 on the registry (npm view node-red@4 version failed); Node-RED cannot be benchmarked here"
    say "installing node-red@$NR_VERSION into $NR_DIR"
    mkdir -p "$NR_DIR"
    (cd "$NR_DIR" && npm init -y >/dev/null && npm install --no-audit --no-fund "node-red@$NR_VERSION") >"$OUT/logs/npm.log" 2>&1 \
      || { tail -20 "$OUT/logs/npm.log" >&2; die "npm install node-red@$NR_VERSION failed (log: $OUT/logs/npm.log); Node-RED cannot be benchmarked here"; }
  fi
fi

# ---- helpers ----------------------------------------------------------------------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits (at most QUIET_WAIT s) until the rest of the machine uses under 0.2 cores, so other
# work (a build, another benchmark) does not land in the numbers. Reports what it saw.
wait_quiet() {
  local waited=0 a b
  while :; do
    a=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat)
    sleep 1
    b=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat)
    local busy=$(( b - a ))     # ticks in 1 s, all cores (100 ticks = one core)
    if (( busy < 20 )); then return 0; fi
    waited=$((waited + 1))
    if (( waited >= QUIET_WAIT )); then say "machine still busy (${busy}% of a core in use by others); measuring anyway"; return 0; fi
    if (( waited == 1 )); then say "machine busy (${busy}% of a core); waiting up to ${QUIET_WAIT}s for it to settle"; fi
  done
}

BROKER_PID=""; SUT_PID=""
cleanup() {
  [[ -n "$SUT_PID" ]] && kill "$SUT_PID" 2>/dev/null || true
  [[ -n "$BROKER_PID" ]] && kill "$BROKER_PID" 2>/dev/null || true
}
trap cleanup EXIT

PORT=""
start_broker() { # nodelay(true|false) dir [limits] -> sets PORT and BROKER_PID
  # limits: closed (the closed-loop passes), unlimited or default (the burst pass)
  local port; port=$(free_port)
  cat > "$2/mosquitto.conf" <<EOF
listener $port 127.0.0.1
allow_anonymous true
persistence false
log_dest none
set_tcp_nodelay $1
EOF
  case "${3:-closed}" in
    closed) cat >> "$2/mosquitto.conf" <<EOF
# The load generator keeps at most $WINDOW messages between send and receive; this keeps the
# broker from dropping queued QoS 1/2 messages of a slow subscriber before that matters.
max_queued_messages 10000
EOF
      ;;
    unlimited) cat >> "$2/mosquitto.conf" <<EOF
# Burst, no limits: any number of QoS 1/2 messages in flight to a client, any number queued.
max_inflight_messages 0
max_queued_messages 0
EOF
      ;;
    default) cat >> "$2/mosquitto.conf" <<EOF
# Burst, mosquitto's default limits: 20 QoS 1/2 messages in flight per client (and at most 20
# unreleased incoming QoS 2), 1,000 queued; beyond that new messages for the client are dropped.
EOF
      ;;
    *) die "start_broker: unknown limits '$3'" ;;
  esac
  chmod -R a+rwx "$2"
  mosquitto -c "$2/mosquitto.conf" >"$2/mosquitto.log" 2>&1 &
  BROKER_PID=$!
  for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && { PORT=$port; return 0; }
    sleep 0.1
  done
  die "mosquitto did not start (see $2/mosquitto.log)"
}

stop_pid() { # pid [name]
  local pid="$1"
  [[ -z "$pid" ]] && return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }; sleep 0.1; done
  say "${2:-process} $pid did not stop within 10 s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

nodered_flow() { # dir port qos
  mkdir -p "$1/userdir"
  cat > "$1/userdir/flows.json" <<EOF
[
  { "id": "bench-tab", "type": "tab", "label": "bench" },
  { "id": "bench-broker", "type": "mqtt-broker", "name": "bench", "broker": "127.0.0.1", "port": "$2",
    "clientid": "", "autoConnect": true, "usetls": false, "protocolVersion": "4", "keepalive": "60",
    "cleansession": true },
  { "id": "bench-in", "type": "mqtt in", "z": "bench-tab", "name": "in", "topic": "bench/in/#", "qos": "$3",
    "datatype": "json", "broker": "bench-broker", "nl": false, "rap": true, "rh": 0, "inputs": 0,
    "wires": [["bench-fn"]] },
  { "id": "bench-fn", "type": "function", "z": "bench-tab", "name": "enrich", "outputs": 1,
    "func": "msg.payload.bridged = true;\nmsg.topic = 'bench/out/' + msg.topic.substring(9);\nreturn msg;",
    "wires": [["bench-out"]] },
  { "id": "bench-out", "type": "mqtt out", "z": "bench-tab", "name": "out", "topic": "", "qos": "$3",
    "retain": "false", "broker": "bench-broker", "wires": [] }
]
EOF
  cat > "$1/settings.js" <<EOF
module.exports = {
  uiPort: $(free_port), uiHost: "127.0.0.1", httpAdminRoot: false, httpNodeRoot: false,
  flowFile: "flows.json", credentialSecret: false,
  logging: { console: { level: "warn", metrics: false, audit: false } }
};
EOF
}

start_sut() { # system port qos dir -> sets SUT_PID ("" for broker only)
  local sys="$1" port="$2" q="$3" dir="$4" url="tcp://127.0.0.1:$2"
  SUT_PID=""
  case "$sys" in
    broker) ;;
    bridge-wait) "$BIN/bridge" --url "$url" --qos "$q" --mode wait >"$dir/sut.log" 2>&1 & SUT_PID=$! ;;
    bridge-pipelined) "$BIN/bridge" --url "$url" --qos "$q" --mode pipelined >"$dir/sut.log" 2>&1 & SUT_PID=$! ;;
    flowbus|flowbus-x4|flowbus-inflight|flowbus-memory)
      local inst=1 infl="" pers=""
      [[ $sys == flowbus-x4 ]] && inst=$INSTANCES_X
      [[ $sys == flowbus-inflight ]] && infl=256
      [[ $sys == flowbus-memory ]] && pers=memory
      flowbus_flow "$dir" "$port" "$q" "$inst" "$infl" "$pers"
      (cd "$dir" && RUST_LOG=warn exec "$FLOWBUS" run --config "$dir/flowbus.toml") >"$dir/sut.log" 2>&1 &
      SUT_PID=$! ;;
    nodered)
      nodered_flow "$dir" "$port" "$q"
      cp "$dir/settings.js" "$dir/userdir/settings.js"
      (cd "$dir" && exec node "$NR_DIR/node_modules/node-red/red.js" --userDir "$dir/userdir" --settings "$dir/userdir/settings.js") >"$dir/sut.log" 2>&1 &
      SUT_PID=$! ;;
    *) die "unknown system '$sys'" ;;
  esac
}

RUN=0
run_one() { # label nodelay system qos rep
  local label="$1" nodelay="$2" sys="$3" q="$4" rep="$5"
  measure "$label" "$nodelay" closed "$sys" "$q" "$rep" \
    --n "$N" --secs "$SECS" --window "$WINDOW" --lat-n "$LAT_N" --rate "$RATE"
}

burst_one() { # limits(unlimited|default) system qos rep
  local n="$BURST_N"
  [[ -z "$n" ]] && case "$3" in 0) n=100000 ;; 1) n=50000 ;; *) n=20000 ;; esac
  measure "burst-$1$SUFFIX" true "$1" "$2" "$3" "$4" \
    --burst "$n" --quiet-secs "$BURST_QUIET" --secs "$BURST_SECS"
}

measure() { # label nodelay limits system qos rep loadgen-args...
  local label="$1" nodelay="$2" limits="$3" sys="$4" q="$5" rep="$6"
  shift 6
  RUN=$((RUN + 1))
  local dir="$OUT/logs/$label-$sys-qos$q-rep$rep"
  mkdir -p "$dir"
  wait_quiet
  start_broker "$nodelay" "$dir" "$limits"
  local port=$PORT
  start_sut "$sys" "$port" "$q" "$dir"
  local args=(--url "tcp://127.0.0.1:$port" --qos "$q" --system "$sys" --label "$label" "$@"
              --broker-pid "$BROKER_PID" --ready-timeout 60)
  [[ -n "$SUT_PID" ]] && args+=(--pid "$SUT_PID")
  [[ $sys == broker ]] && args+=(--direct)
  local line mode=""
  [[ $limits != closed ]] && mode="\"mode\":\"burst\","
  if line=$("$BIN/loadgen" "${args[@]}" 2>"$dir/loadgen.err"); then
    echo "$line" | sed "s/^{/{\"rep\":$rep,/" >> "$RESULTS"
    say "#$RUN $(tail -1 "$dir/loadgen.err")"
  else
    say "#$RUN $label $sys qos $q rep $rep FAILED: $(tail -1 "$dir/loadgen.err")"
    echo "{\"rep\":$rep,$mode\"system\":\"$sys\",\"label\":\"$label\",\"qos\":$q,\"failed\":true}" >> "$RESULTS"
  fi
  stop_pid "$SUT_PID" "$sys"; SUT_PID=""
  stop_pid "$BROKER_PID" mosquitto; BROKER_PID=""
}

{
  echo "date: $(date -Is)"
  echo "host: $(uname -srm); $(nproc) cores; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'); $(free -h | awk '/^Mem:/{print $2}') memory"
  echo "mosquitto: $(mosquitto -h 2>/dev/null | head -1)"
  echo "paho-mqtt: $(grep -A1 'name = "paho-mqtt"' "$HERE/Cargo.lock" | sed -n 2p | cut -d'"' -f2) (paho-mqtt-sys $(grep -A1 'name = "paho-mqtt-sys"' "$HERE/Cargo.lock" | sed -n 2p | cut -d'"' -f2))"
  echo "rustc: $(rustc --version)"
  if [[ -n "${FLOWBUS_ARG:-}" ]]; then
    echo "flowbus: $FLOWBUS (--flowbus; benchmark tree $(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo unknown))"
  else
    echo "flowbus: $(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo unknown)"
  fi
  if [[ " $ALL_SYSTEMS " == *" nodered "* ]]; then
    echo "node-red: $(node -p "require('$NR_DIR/node_modules/node-red/package.json').version") on node $(node --version)"
  fi
  echo "command: $0 ${ORIG_ARGS[*]}"
  if [[ $MAIN_TABLE == 1 || $NAGLE_TABLE == 1 ]]; then
    echo "parameters: reps=$REPS qos=[$QOS] systems=[$SYSTEMS] n=$N secs=$SECS window=$WINDOW lat_n=$LAT_N rate=$RATE"
  fi
  if [[ $BURST == 1 ]]; then
    echo "burst: reps=$REPS qos=[$QOS] systems=[$BURST_SYSTEMS] brokers=[$BROKERS] n=${BURST_N:-100000/50000/20000 by QoS} quiet=${BURST_QUIET}s cap=${BURST_SECS}s"
  fi
} > "$OUT/machine.txt"

say "results in $OUT"
if [[ $MAIN_TABLE == 1 ]]; then
  for rep in $(seq "$REPS"); do
    for q in $QOS; do
      for sys in $SYSTEMS; do
        run_one "nodelay$SUFFIX" "true" "$sys" "$q" "$rep"
      done
    done
  done
fi
if [[ $NAGLE_TABLE == 1 ]]; then
  DREPS=1; [[ $MAIN_TABLE == 0 ]] && DREPS=$REPS
  for rep in $(seq "$DREPS"); do
    for q in $QOS; do
      for sys in $SYSTEMS; do
        run_one "default$SUFFIX" "false" "$sys" "$q" "$rep"
      done
    done
  done
fi
CLOSED_S=$SECONDS
if [[ $BURST == 1 ]]; then
  for rep in $(seq "$REPS"); do
    for b in $BROKERS; do
      for q in $QOS; do
        for sys in $BURST_SYSTEMS; do
          burst_one "$b" "$sys" "$q" "$rep"
        done
      done
    done
  done
fi
echo "elapsed: $((SECONDS / 60)) min $((SECONDS % 60)) s in all, $(( (SECONDS - CLOSED_S) / 60 )) min $(( (SECONDS - CLOSED_S) % 60 )) s of it in the burst pass" >> "$OUT/machine.txt"

"$BIN/report" --results "$RESULTS" --machine "$OUT/machine.txt" > "$OUT/report.md"
cat "$OUT/report.md"
say "report: $OUT/report.md"
