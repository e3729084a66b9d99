#!/usr/bin/env bash
# Starts the relay of server ${server} (project ${project}) in the background: the sites
# dial out to it and the Airflow side reaches them through it, on port ${port}.
# Logs and the pid file go to ../run/; startup/ itself stays untouched (it is signed).
# Pass --foreground to run in this terminal instead (systemd, containers); other
# arguments go to `flare relay start` (e.g. --host 10.0.0.5, --root-fingerprint SHA256).
set -euo pipefail
KIT="$$(cd "$$(dirname "$${BASH_SOURCE[0]}")/.." && pwd)"
RUN="$$KIT/run"
mkdir -p "$$RUN"
if [ "$${1:-}" = "--foreground" ]; then
  shift
  exec flare relay start --kit "$$KIT" "$$@"
fi
if [ -f "$$RUN/relay.pid" ] && kill -0 "$$(cat "$$RUN/relay.pid")" 2>/dev/null; then
  echo "relay already running (pid $$(cat "$$RUN/relay.pid"))" >&2
  exit 1
fi
nohup flare relay start --kit "$$KIT" "$$@" >>"$$RUN/relay.log" 2>&1 &
PID=$$!
echo "$$PID" >"$$RUN/relay.pid"
# A kit that fails its signature check or a port in use ends the relay at once: say so here.
sleep 1
if ! kill -0 "$$PID" 2>/dev/null; then
  rm -f "$$RUN/relay.pid"
  echo "relay ${server} did not start; the end of $$RUN/relay.log:" >&2
  tail -n 5 "$$RUN/relay.log" >&2
  exit 1
fi
echo "relay ${server} started (pid $$PID), listening on port ${port}; log: $$RUN/relay.log"
