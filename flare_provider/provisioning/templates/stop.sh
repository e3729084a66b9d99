#!/usr/bin/env bash
# Stops the ${what} started by start.sh: SIGTERM, then up to 30 s for a clean shutdown
# before SIGKILL. ${after_stop}
set -euo pipefail
KIT="$$(cd "$$(dirname "$${BASH_SOURCE[0]}")/.." && pwd)"
PIDFILE="$$KIT/run/${process}.pid"
if [ ! -f "$$PIDFILE" ]; then
  echo "no ${process} pid file at $$PIDFILE: ${process} not started by start.sh" >&2
  exit 1
fi
PID="$$(cat "$$PIDFILE")"
if kill -TERM "$$PID" 2>/dev/null; then
  for _ in $$(seq 1 30); do
    kill -0 "$$PID" 2>/dev/null || break
    sleep 1
  done
  if kill -0 "$$PID" 2>/dev/null; then
    echo "${process} $$PID did not stop in 30 s; sending SIGKILL" >&2
    kill -KILL "$$PID" 2>/dev/null || true
  fi
fi
rm -f "$$PIDFILE"
echo "${what} stopped"
