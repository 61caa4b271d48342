#!/usr/bin/env bash
# Makes sure this machine can build and test flowbus. Idempotent and quiet when everything is
# there; safe to run non-interactively (CI=true, no terminal).
#
# System packages (Debian/Ubuntu): cmake, libssl-dev and pkg-config build paho-mqtt's bundled C
# client; gcc/g++ (build-essential when missing) compile it; mosquitto and mosquitto-clients are
# the broker the end-to-end tests start themselves, each on a free port of its own. Debian's
# mosquitto package may also start a system broker on port 1883: nothing here or in the tests
# relies on it, or on it being absent.
#
# As root, missing packages are installed with apt-get. Otherwise the exact command to run is
# printed and the script exits 1.
#
#   scripts/setup.sh          system packages and cargo
#   scripts/setup.sh --lint   also rustfmt and clippy (for `make check` and .ci/run)
set -euo pipefail

lint=0
for arg in "$@"; do
  case "$arg" in
    --lint) lint=1 ;;
    -h | --help)
      sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "setup.sh: unknown argument '$arg' (try --help)" >&2
      exit 2
      ;;
  esac
done

say() { echo "setup: $*" >&2; }

installed() {
  dpkg -s "$1" 2>/dev/null | grep -q '^Status: install ok installed'
}

packages=(cmake libssl-dev pkg-config mosquitto mosquitto-clients)

if command -v dpkg >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  missing=()
  for p in "${packages[@]}"; do
    installed "$p" || missing+=("$p")
  done
  if ! { installed gcc && installed g++; } && ! installed build-essential; then
    missing+=(build-essential)
  fi
  if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
      say "installing ${missing[*]}"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
      for p in "${missing[@]}"; do
        installed "$p" || {
          say "apt-get did not install $p"
          exit 1
        }
      done
    else
      say "missing system packages: ${missing[*]}"
      say "install them with:"
      echo "  sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}" >&2
      exit 1
    fi
  fi
else
  # Not Debian: check for the tools themselves and say what they are.
  missing=()
  for t in cmake pkg-config mosquitto mosquitto_pub cc c++; do
    command -v "$t" >/dev/null 2>&1 || missing+=("$t")
  done
  if ((${#missing[@]})); then
    say "missing tools: ${missing[*]}"
    say "install your system's packages for cmake, pkg-config, OpenSSL headers, a C/C++ compiler, and the mosquitto broker and clients"
    exit 1
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  say "no Rust toolchain (cargo) on PATH. Install one with rustup:"
  echo "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component rustfmt,clippy" >&2
  echo "  . \"\$HOME/.cargo/env\"" >&2
  exit 1
fi

if ((lint)); then
  for c in fmt clippy; do
    if ! cargo "$c" --version >/dev/null 2>&1; then
      say "cargo $c is not installed; with rustup: rustup component add ${c/fmt/rustfmt}"
      exit 1
    fi
  done
fi
