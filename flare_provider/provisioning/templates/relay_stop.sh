#!/usr/bin/env bash
# Stops the relay of server ${server} started by start.sh: SIGTERM, then up to 30 s before
# SIGKILL. The sites keep trying to attach and come back once it runs again.
set -euo pipefail
KIT="$$(cd "$$(dirname "$${BASH_SOURCE[0]}")/.." && pwd)"
PIDFILE="$$KIT/run/relay.pid"
if [ ! -f "$$PIDFILE" ]; then
  echo "no relay pid file at $$PIDFILE: relay not started by start.sh" >&2
  exit 1
fi
PID="$$(cat "$$PIDFILE")"
if kill -TERM "$$PID" 2>/dev/null; then
  for _ in $$(seq 1 30); do
    kill -0 "$$PID" 2>/dev/null || break
    sleep 1
  done
  if kill -0 "$$PID" 2>/dev/null; then
    echo "relay $$PID did not stop in 30 s; sending SIGKILL" >&2
    kill -KILL "$$PID" 2>/dev/null || true
  fi
fi
rm -f "$$PIDFILE"
echo "relay ${server} stopped"
