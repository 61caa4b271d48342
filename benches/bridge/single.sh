# Sourced by profile.sh and soak.sh: builds flowbus and the load generator, starts a private
# mosquitto (set_tcp_nodelay true) and `flowbus run` with the benchmark flow (subscribe
# bench/in/#, Rhai enrich, publish bench/out/...) in $OUT.
#
# In: ROOT, HERE, OUT (absolute), QOS; optional SUB_EXTRA (more MQTTSubscribe properties, e.g.
# ', "in_flight": 256') and FLOWBUS_EXTRA (more flowbus.toml). Out: BIN, PORT, BROKER, FB.
# The caller's EXIT trap should kill $FB and $BROKER.
(cd "$ROOT" && cargo build --release --bin flowbus) >"$OUT/build.log" 2>&1
(cd "$HERE" && cargo build --release --bins) >>"$OUT/build.log" 2>&1
BIN="$ROOT/target/bench/release"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest none\nset_tcp_nodelay true\nmax_queued_messages 10000\n' "$PORT" > "$OUT/mosquitto.conf"
chmod -R a+rwx "$OUT"
mosquitto -c "$OUT/mosquitto.conf" & BROKER=$!
sleep 0.3
cat > "$OUT/bridge.json" <<JSON
{ "name": "bridge",
  "nodes": [
    { "id": "in", "type": "MQTTSubscribe", "url": "tcp://127.0.0.1:$PORT", "topic": "bench/in/#", "qos": $QOS, "domain": "JSON"${SUB_EXTRA:-} },
    { "id": "enrich", "type": "Compute", "script": "enrich.rhai" },
    { "id": "out", "type": "MQTTPublish", "url": "tcp://127.0.0.1:$PORT", "qos": $QOS } ],
  "connections": [ { "from": "in.Out", "to": "enrich" }, { "from": "enrich.Out", "to": "out" } ] }
JSON
cat > "$OUT/enrich.rhai" <<'RHAI'
Root.Body.bridged = true;
let topic = LocalEnvironment.MQTT.Input.Topic;
LocalEnvironment.Destination = #{ MQTT: #{ Output: #{ TopicName: "bench/out/" + topic.sub_string(9) } } };
RHAI
printf 'data_dir = "%s/data"\nflows = ["%s/bridge.json"]\n[admin]\nlisten = "127.0.0.1:0"\n%s' "$OUT" "$OUT" "${FLOWBUS_EXTRA:-}" > "$OUT/flowbus.toml"
(cd "$OUT" && RUST_LOG=warn exec "$ROOT/target/release/flowbus" run --config "$OUT/flowbus.toml") >"$OUT/flowbus.log" 2>&1 &
FB=$!
