#!/usr/bin/env bash
# Runs every test against the real RabbitMQ, chromedriver + Chromium and
# Prometheus, installing what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
# Browser tests are CPU-heavy: a few at a time keeps timings sane on 2 cores.
cargo test --locked -- --test-threads="${BROWSERFLEET_TEST_THREADS:-3}" "$@"
