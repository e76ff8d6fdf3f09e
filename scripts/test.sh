#!/usr/bin/env bash
# Runs every test against the real RabbitMQ, chromedriver + Chromium and
# Prometheus, installing what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
# Smoke run of the benchmark harness (BENCHMARKS.md) with tiny counts, so it
# keeps compiling and working; it asserts no timing, only that it runs and
# loses no task. Skipped when arguments select particular tests.
if [ "$#" -eq 0 ]; then
  cargo build --locked --bin browserfleet --example bench
  cargo run --locked --example bench -- --quick
fi
# Browser tests are CPU-heavy: a few at a time keeps timings sane on 2 cores.
cargo test --locked -- --test-threads="${BROWSERFLEET_TEST_THREADS:-3}" "$@"
