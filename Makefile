# flowbus developer commands. `make test` and `make run` are the two that matter; both first run
# scripts/setup.sh, which installs (as root) or names (otherwise) the system packages needed.

CARGO ?= cargo

.PHONY: test run check fmt setup build bench bench-nodered bench-burst bench-quick bench-micro bench-count bench-profile bench-soak bench-lint soak-faults soak-session-loss

## test: install what is missing, then run every test of the workspace
test: setup
	$(CARGO) test --workspace

## run: install what is missing, then run the daemon on the flows in flows/ (Ctrl-C stops it)
run: setup
	scripts/run.sh

## check: formatting and clippy with warnings as errors
check:
	scripts/setup.sh --lint
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## fmt: format the code
fmt:
	$(CARGO) fmt --all

## build: a release build of the flowbus binary (target/release/flowbus)
build: setup
	$(CARGO) build --release

setup:
	scripts/setup.sh

# Benchmarks: timed runs stay out of `make test`. The bench package (benches/bridge) is not a
# workspace member, so `test` and `check` never build it. See benches/bridge/README.md and
# docs/PERFORMANCE.md.

## bench: the end-to-end bridge benchmark, QoS 0/1/2, 3 repetitions, nodelay and default broker (~12 min),
## then the open-loop burst pass against an unlimited and a default-limits broker (~9 min)
bench: setup
	benches/bridge/run.sh --with-burst

## bench-nodered: the same with Node-RED 4, installed from npm into target/bench-nodered
bench-nodered: setup
	benches/bridge/run.sh --nodered --with-burst

## bench-burst: the open-loop burst pass alone (flowbus, both paho bridges; ~9 min)
bench-burst: setup
	benches/bridge/run.sh --burst

## bench-quick: one repetition, smaller runs, nodelay broker only (~4 min)
bench-quick: setup
	benches/bridge/run.sh --quick

## bench-micro: criterion microbenchmarks of the engine path (no MQTT) and of flow validation
bench-micro:
	cd benches/bridge && $(CARGO) bench --bench engine

## bench-count: instructions per message of the engine path (callgrind: repeatable on a busy machine)
bench-count:
	benches/bridge/count.sh

## bench-profile: perf profile of flowbus bridging at full load (QOS=1 by default)
bench-profile: setup
	benches/bridge/profile.sh --qos $(or $(QOS),1)

## bench-soak: RSS of flowbus across 1,000,000 bridged messages (QOS=1 by default)
bench-soak: setup
	benches/bridge/soak.sh --qos $(or $(QOS),1)

## soak-faults: QoS 1/2 relays while the broker is restarted, killed and frozen (>= 16 min, 100 faults; ASAN=1 or VALGRIND=1 for a memory checker)
soak-faults: setup
	benches/bridge/soak-faults.sh $(if $(ASAN),--asan) $(if $(VALGRIND),--valgrind) $(SOAK_ARGS)

## soak-session-loss: issue 18 item 8's scenario (broker back without sessions) RUNS times (5) under a memory checker (valgrind; ASAN=1 for AddressSanitizer)
soak-session-loss: setup
	benches/bridge/soak-faults.sh --session-loss --runs $(or $(RUNS),5) $(if $(ASAN),--asan,--valgrind) $(SOAK_ARGS)

## bench-lint: fmt, clippy -D warnings and unit tests of the bench package
bench-lint:
	cd benches/bridge && $(CARGO) fmt --check && $(CARGO) clippy --all-targets -- -D warnings && $(CARGO) test --release
