#!/usr/bin/env bash
# Runs the flowbus daemon on the flows in flows/ (what `make run` does).
#
# - The configuration is FLOWBUS_CONFIG, or ./flowbus.toml (the gateway scenario: servers on
#   127.0.0.1:1883).
# - Every server the configuration puts on this machine (tcp://127.0.0.1:PORT or
#   tcp://localhost:PORT) that nothing listens on gets a private mosquitto for the run, stopped
#   when flowbus exits. A broker already listening there is used as it is.
# - Without a configuration, when a flow in flows/ has an MQTT node, a private mosquitto is
#   started on 127.0.0.1:1883 (the default broker), or on a free port when 1883 is taken; its URL
#   is exported as FLOWBUS_MQTT_URL and FLOWBUS_MQTT_PORT.
#
# Extra arguments go to `flowbus run`, e.g. `scripts/run.sh --shutdown-timeout 2s`.
set -euo pipefail
cd "$(dirname "$0")/.."

flows_dir=${FLOWBUS_FLOWS:-flows}
config=${FLOWBUS_CONFIG:-}
if [[ -z $config && -f flowbus.toml ]]; then
  config=flowbus.toml
fi
if [[ -n $config && ! -f $config ]]; then
  echo "run.sh: FLOWBUS_CONFIG names $config, which does not exist" >&2
  exit 1
fi

args=(run)
if [[ -n $config ]]; then
  args+=(--config "$config")
else
  args+=(--flows "$flows_dir")
fi
args+=("$@")

servers_configured() {
  [[ -n $config ]] && grep -Eq '^[[:space:]]*\[servers\.' "$config"
}

# The ports of the configured servers on this machine.
local_server_ports() {
  grep -Eo 'url[[:space:]]*=[[:space:]]*"(tcp|mqtt)://(127\.0\.0\.1|localhost):[0-9]+"' "$config" |
    grep -Eo '[0-9]+"$' | tr -d '"' | sort -u
}

flows_use_mqtt() {
  grep -Eqs '"type"[[:space:]]*:[[:space:]]*"MQTT' "$flows_dir"/*.json
}

port_free() {
  # Something accepts connections on the port: taken.
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

free_port() {
  local p
  for _ in $(seq 1 50); do
    p=$((20000 + RANDOM % 40000))
    if port_free "$p"; then
      echo "$p"
      return 0
    fi
  done
  return 1
}

broker_pid=
workdir=
cleanup() {
  if [[ -n $broker_pid ]]; then
    kill "$broker_pid" 2>/dev/null || true
    wait "$broker_pid" 2>/dev/null || true
  fi
  if [[ -n $workdir ]]; then
    rm -rf "$workdir"
  fi
}
trap cleanup EXIT

start_broker() {
  if ! command -v mosquitto >/dev/null 2>&1; then
    echo "run.sh: the flows need an MQTT broker and mosquitto is not installed (run scripts/setup.sh)" >&2
    exit 1
  fi
  local port=${1:-1883}
  if [[ -z ${1:-} ]] && ! port_free "$port"; then
    port=$(free_port) || {
      echo "run.sh: no free port for a private mosquitto" >&2
      exit 1
    }
    echo "run.sh: port 1883 is taken; the private broker uses port $port (FLOWBUS_MQTT_URL)" >&2
  fi
  workdir=$(mktemp -d)
  cat >"$workdir/mosquitto.conf" <<EOF
listener $port 127.0.0.1
set_tcp_nodelay true
allow_anonymous true
persistence false
log_dest stderr
log_type error
log_type warning
EOF
  mosquitto -c "$workdir/mosquitto.conf" &
  broker_pid=$!
  for _ in $(seq 1 50); do
    if ! port_free "$port"; then
      export FLOWBUS_MQTT_PORT=$port
      export FLOWBUS_MQTT_URL="tcp://127.0.0.1:$port"
      echo "run.sh: private mosquitto on $FLOWBUS_MQTT_URL (stopped when flowbus exits)" >&2
      return 0
    fi
    if ! kill -0 "$broker_pid" 2>/dev/null; then
      broker_pid=
      echo "run.sh: mosquitto did not start" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "run.sh: mosquitto did not open port $port within 5 s" >&2
  exit 1
}

if servers_configured; then
  for port in $(local_server_ports); do
    if port_free "$port"; then
      start_broker "$port"
      break # one private broker; flowbus.toml's servers on this machine share it
    fi
  done
elif flows_use_mqtt; then
  start_broker
fi

# flowbus runs as a child so the EXIT trap can stop the broker; INT and TERM are passed on so
# the daemon shuts down gracefully.
cargo run --release -- "${args[@]}" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' INT TERM
status=0
while :; do
  wait "$child" && status=0 || status=$?
  # `wait` returns early (status > 128) when a trapped signal arrives; wait again until the
  # daemon has really exited.
  kill -0 "$child" 2>/dev/null || break
done
exit "$status"
