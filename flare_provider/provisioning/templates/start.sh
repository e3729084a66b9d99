#!/usr/bin/env bash
# Starts the site agent of ${site} (project ${project}) in the background.
# Logs and the pid file go to ../run/; startup/ itself stays untouched (it is signed).
# Pass --foreground to run in this terminal instead (containers do this).
set -euo pipefail
KIT="$$(cd "$$(dirname "$${BASH_SOURCE[0]}")/.." && pwd)"
RUN="$$KIT/run"
mkdir -p "$$RUN"
if [ "$${1:-}" = "--foreground" ]; then
  shift
  exec flare-agent start --kit "$$KIT" "$$@"
fi
if [ -f "$$RUN/agent.pid" ] && kill -0 "$$(cat "$$RUN/agent.pid")" 2>/dev/null; then
  echo "agent already running (pid $$(cat "$$RUN/agent.pid"))" >&2
  exit 1
fi
nohup flare-agent start --kit "$$KIT" "$$@" >>"$$RUN/agent.log" 2>&1 &
PID=$$!
echo "$$PID" >"$$RUN/agent.pid"
# local/site.yaml decides how the agent is reached; without a connect line it dials out.
MODE="$$(sed -n '/^connect:/{s/^connect:[[:space:]]*\([a-z]*\).*/\1/p;q;}' "$$KIT/local/site.yaml" 2>/dev/null || true)"
if [ "$$MODE" = listen ]; then
  REACHED="listening on port ${port}"
else
  REACHED='dialling out to the relays ${relays}'
fi
echo "agent for ${site} started (pid $$PID), $$REACHED; log: $$RUN/agent.log"
