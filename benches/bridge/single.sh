# Sourced by profile.sh and soak.sh: builds flowbus and the load generator, starts a private
# mosquitto (set_tcp_nodelay true) and `flowbus run` with the benchmark flow (subscribe
# bench/in/#, Rhai enrich, publish bench/out/...) in $OUT.
#
# In: ROOT, HERE, OUT (absolute), QOS; optional IN_FLIGHT (the subscriber's in_flight window)
# and FLOWBUS_EXTRA (more flowbus.toml). Out: BIN, PORT, BROKER, FB.
# The caller's EXIT trap should kill $FB and $BROKER.
# shellcheck source=flow.sh
source "$HERE/flow.sh"
(cd "$ROOT" && cargo build --release --bin flowbus) >"$OUT/build.log" 2>&1
(cd "$HERE" && cargo build --release --bins) >>"$OUT/build.log" 2>&1
BIN="$ROOT/target/bench/release"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest none\nset_tcp_nodelay true\nmax_queued_messages 10000\n' "$PORT" > "$OUT/mosquitto.conf"
chmod -R a+rwx "$OUT"
mosquitto -c "$OUT/mosquitto.conf" & BROKER=$!
sleep 0.3
flowbus_flow "$OUT" "$PORT" "$QOS" 1 "${IN_FLIGHT:-}"
printf '%s' "${FLOWBUS_EXTRA:-}" >> "$OUT/flowbus.toml"
(cd "$OUT" && RUST_LOG=warn exec "$ROOT/target/release/flowbus" run --config "$OUT/flowbus.toml") >"$OUT/flowbus.log" 2>&1 &
FB=$!
