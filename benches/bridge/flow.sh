# Sourced by run.sh, single.sh and threads.sh: writes the benchmark bridge as a flowbus flow
# (subscribe bench/in/#, parse JSON, add a field in Rhai, publish to bench/out/... at the same
# QoS) with its script and a flowbus.toml into a directory.
#
#   flowbus_flow DIR PORT QOS INSTANCES [IN_FLIGHT] [PERSISTENCE]
#
# IN_FLIGHT: the subscriber's in_flight window (empty: the default). PERSISTENCE (file or
# memory): publish through a named server with that persistence (empty: the URL directly).
# Callers append more settings to DIR/flowbus.toml.

flowbus_flow() { # dir port qos instances in_flight persistence(file|memory)
  local extra="" server="\"url\": \"tcp://127.0.0.1:$2\""
  [[ -n "${5:-}" ]] && extra=", \"in_flight\": $5"
  # A named server, so its settings (persistence) apply; the URL is the same.
  [[ -n "${6:-}" ]] && server="\"server\": \"bench\""
  cat > "$1/bridge.json" <<EOF
{
  "name": "bridge",
  "description": "Benchmark bridge: bench/in/# -> add a field in Rhai -> bench/out/...",
  "nodes": [
    { "id": "in", "type": "MQTTSubscribe", $server, "topic": "bench/in/#",
      "qos": $3, "domain": "JSON", "instances": $4$extra },
    { "id": "enrich", "type": "Compute", "script": "enrich.rhai" },
    { "id": "out", "type": "MQTTPublish", $server, "qos": $3 }
  ],
  "connections": [
    { "from": "in.Out", "to": "enrich" },
    { "from": "enrich.Out", "to": "out" }
  ]
}
EOF
  cat > "$1/enrich.rhai" <<'EOF'
// Add a field, and publish to bench/out/<what followed bench/in/>.
Root.Body.bridged = true;
let topic = LocalEnvironment.MQTT.Input.Topic;
LocalEnvironment.Destination = #{ MQTT: #{ Output: #{ TopicName: "bench/out/" + topic.sub_string(9) } } };
EOF
  cat > "$1/flowbus.toml" <<EOF
data_dir = "$1/data"
flows = ["$1/bridge.json"]
[admin]
listen = "127.0.0.1:0"
EOF
  if [[ -n "${6:-}" ]]; then
    printf '[servers.bench]\nurl = "tcp://127.0.0.1:%s"\npersistence = "%s"\n' "$2" "$6" >> "$1/flowbus.toml"
  fi
}
