#!/usr/bin/env bash
# Installs what browserfleet's demo and tests need on a Debian machine, and
# starts RabbitMQ if it is installed but not running. Idempotent.
#   scripts/setup.sh            chromium + chromium-driver, RabbitMQ up
#   scripts/setup.sh --test     also promtool (prometheus), docker-compose,
#                               and RabbitMQ's prometheus/management plugins
set -euo pipefail

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if [[ $want_test -eq 1 ]]; then
  command -v promtool >/dev/null || missing+=(prometheus)
  command -v docker-compose >/dev/null || missing+=(docker-compose)
fi
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "setup: installing ${missing[*]}" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's prometheus package may start a server on :9090; tests start their own.
if [[ $want_test -eq 1 ]] && pgrep -x prometheus >/dev/null; then
  as_root pkill -x prometheus || true
fi

amqp_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! amqp_up; then
  if command -v rabbitmq-server >/dev/null; then
    echo "setup: starting RabbitMQ" >&2
    as_root rabbitmq-server -detached
    for _ in $(seq 1 60); do amqp_up && break; sleep 1; done
  fi
fi
if ! amqp_up; then
  echo "setup: no RabbitMQ on 127.0.0.1:5672. Install it (apt-get install rabbitmq-server) or run one (docker run -p 5672:5672 rabbitmq:4)." >&2
  exit 1
fi
if [[ $want_test -eq 1 ]] && command -v rabbitmq-plugins >/dev/null; then
  as_root rabbitmq-plugins enable --quiet rabbitmq_management rabbitmq_prometheus >/dev/null
  for _ in $(seq 1 30); do (exec 3<>/dev/tcp/127.0.0.1/15692) 2>/dev/null && break; sleep 1; done
fi
command -v cargo >/dev/null || { echo "setup: cargo not found: install Rust from https://rustup.rs" >&2; exit 1; }
