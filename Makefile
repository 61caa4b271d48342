# Benchmarks (timed runs stay out of `make test`). See benches/bridge/README.md and
# docs/PERFORMANCE.md.
.PHONY: bench bench-nodered bench-quick bench-micro bench-lint

bench:            ## end-to-end bridge benchmark (~15 min on 2 cores)
	benches/bridge/run.sh

bench-nodered:    ## the same, with Node-RED 4 installed from npm into target/bench-nodered
	benches/bridge/run.sh --nodered

bench-quick:      ## one repetition, smaller runs (~3 min)
	benches/bridge/run.sh --quick

bench-micro:      ## criterion microbenchmarks of the engine path (no MQTT)
	cd benches/bridge && cargo bench --bench engine

bench-lint:       ## fmt, clippy and unit tests of the bench package
	cd benches/bridge && cargo fmt --check && cargo clippy --all-targets -- -D warnings && cargo test --release
