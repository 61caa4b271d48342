#!/usr/bin/env bash
# Instructions per message of the engine path, counted by valgrind's callgrind: repeatable on
# a shared machine where wall-clock microbenchmarks are not. Runs examples/engine_count.rs at
# N1 and N2 repetitions and prints (Ir(N2) - Ir(N1)) / (N2 - N1), so set-up cancels out.
#
#   benches/bridge/count.sh [--n1 200] [--n2 1200]        (make bench-count)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
N1=200; N2=1200
while [[ $# -gt 0 ]]; do
  case "$1" in
    --n1) N1="$2"; shift 2 ;;
    --n2) N2="$2"; shift 2 ;;
    -h|--help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "count.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
command -v valgrind >/dev/null || { echo "count.sh: needs valgrind (apt-get install valgrind)" >&2; exit 1; }
(cd "$HERE" && cargo build --release --example engine_count) >&2
BIN="$HERE/../../target/bench/release/examples/engine_count"
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
ir() { # step n -> total instructions
  valgrind --tool=callgrind --callgrind-out-file="$TMP/cg.$1.$2" "$BIN" "$1" "$2" >/dev/null 2>&1
  grep '^summary:' "$TMP/cg.$1.$2" | awk '{print $2}'
}
for step in script all; do
  a=$(ir "$step" "$N1"); b=$(ir "$step" "$N2")
  echo "$step: $(( (b - a) / (N2 - N1) )) instructions per message"
done
