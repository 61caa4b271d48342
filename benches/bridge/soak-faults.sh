#!/usr/bin/env bash
# Broker fault-injection soak: flowbus relays QoS 1 and QoS 2 streams through flows with
# persistent sessions while a persistent mosquitto is restarted (SIGTERM), killed (SIGKILL)
# and frozen (SIGSTOP ... SIGCONT) again and again. Reports faults survived (per kind),
# messages sent, delivered, lost and duplicated (per QoS and phase), crashes, stalls and the
# daemon's peak RSS. See src/bin/faultsoak.rs and docs/PERFORMANCE.md ("Broker faults").
#
#   benches/bridge/soak-faults.sh [--secs 960] [--min-faults 100] [--rate 40] [--out DIR]
#   benches/bridge/soak-faults.sh --session-loss [--runs 5] [--valgrind | --asan]
#
# --session-loss: issue 18 item 8's scenario (a persistent relay, back-pressure, mosquitto
# without persistence stopped and started) --runs times, each with a fresh broker and daemon.
# --valgrind: run the daemon under valgrind memcheck (slow: use --loop to shorten the Compute).
# --asan: build flowbus with Paho C compiled with AddressSanitizer (PAHO_SANITIZE=address,
# into target/asan) and preload the ASan runtime. Either checker also works with the soak.
# Other options go to faultsoak unchanged (--loop, --stall, --seed, --autosave).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
SCENARIO=soak; CHECKER=""; OUT=""; PASS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --session-loss) SCENARIO=session-loss; shift ;;
    --valgrind) CHECKER=valgrind; shift ;;
    --asan) CHECKER=asan; shift ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) PASS+=("$1"); shift ;;
  esac
done
OUT="${OUT:-$ROOT/target/soak-faults/$SCENARIO${CHECKER:+-$CHECKER}-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
command -v mosquitto >/dev/null || { echo "soak-faults: mosquitto is needed (make setup)" >&2; exit 1; }

FLOWBUS="$ROOT/target/release/flowbus"
WRAP=""; ENV=""
case "$CHECKER" in
  asan)
    # A target directory of its own, so the ordinary build is not rebuilt without ASan.
    (cd "$ROOT" && PAHO_SANITIZE=address CARGO_TARGET_DIR="$ROOT/target/asan" cargo build --release --bin flowbus) >"$OUT/build.log" 2>&1
    FLOWBUS="$ROOT/target/asan/release/flowbus"
    # Rust's allocator is malloc, so ASan sees every heap block; leaks at exit are not the
    # question here.
    ENV="LD_PRELOAD=$(gcc -print-file-name=libasan.so),ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:verify_asan_link_order=0"
    ;;
  valgrind)
    command -v valgrind >/dev/null || { echo "soak-faults: valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
    (cd "$ROOT" && cargo build --release --bin flowbus) >"$OUT/build.log" 2>&1
    WRAP="valgrind --error-exitcode=99 --num-callers=30 --child-silent-after-fork=yes"
    ;;
  *)
    (cd "$ROOT" && cargo build --release --bin flowbus) >"$OUT/build.log" 2>&1
    ;;
esac
(cd "$HERE" && cargo build --release --bin faultsoak) >>"$OUT/build.log" 2>&1
echo "soak-faults: $SCENARIO${CHECKER:+ under $CHECKER}; working in $OUT" >&2
"$ROOT/target/bench/release/faultsoak" --flowbus "$FLOWBUS" --out "$OUT" --scenario "$SCENARIO" \
  ${WRAP:+--wrap "$WRAP"} ${ENV:+--env "$ENV"} "${PASS[@]}" > "$OUT/result.json.tmp" 2> >(tee "$OUT/progress.log" >&2)
mv "$OUT/result.json.tmp" "$OUT/result.json"
echo "soak-faults: result in $OUT/result.json" >&2
