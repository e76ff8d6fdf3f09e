#!/usr/bin/env bash
# The demo: a worker and a handful of sample tasks against local pages; the
# results are printed as JSON lines.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --locked --quiet
bin=target/debug/browserfleet

export BROWSERFLEET__AMQP__TASK_QUEUE=browserfleet.demo.tasks
export BROWSERFLEET__AMQP__RESULT_QUEUE=browserfleet.demo.results
export BROWSERFLEET__AMQP__DEAD_LETTER_QUEUE=browserfleet.demo.dead
export BROWSERFLEET__METRICS__LISTEN="${BROWSERFLEET__METRICS__LISTEN:-127.0.0.1:0}"
log=$(mktemp -t browserfleet-demo.XXXXXX.log)

"$bin" run 2>"$log" &
worker=$!
trap 'kill -TERM $worker 2>/dev/null; wait $worker 2>/dev/null || true' EXIT

echo "== worker started (log: $log); publishing examples/demo-tasks.jsonl and waiting for results" >&2
site="file://$PWD/examples/site"
status=0
sed "s#{{SITE}}#$site#g" examples/demo-tasks.jsonl | "$bin" enqueue --wait --timeout 120 - || status=$?
# Exit status 1 only says some task failed: the demo includes one on purpose.
if [[ $status -gt 1 ]]; then
  echo "== enqueue failed (exit $status); worker log:" >&2
  cat "$log" >&2
  exit "$status"
fi
echo "== worker log (last lines):" >&2
tail -n 8 "$log" >&2
