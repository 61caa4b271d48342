# flowbus developer commands. `make test` and `make run` are the two that matter; both first run
# scripts/setup.sh, which installs (as root) or names (otherwise) the system packages needed.

CARGO ?= cargo

.PHONY: test run check fmt setup build

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
