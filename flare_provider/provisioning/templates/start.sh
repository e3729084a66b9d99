#!/usr/bin/env bash
# Starts the ${what} (project ${project}) in the background.
# Logs and the pid file go to ../run/; startup/ itself stays untouched (it is signed).
# Pass --foreground to run in this terminal instead (systemd, containers); other
# arguments go to `${command}` (e.g. --root-fingerprint SHA256).
set -euo pipefail
KIT="$$(cd "$$(dirname "$${BASH_SOURCE[0]}")/.." && pwd)"
RUN="$$KIT/run"
mkdir -p "$$RUN"
if [ "$${1:-}" = "--foreground" ]; then
  shift
  exec ${command} --kit "$$KIT" "$$@"
fi
if [ -f "$$RUN/${process}.pid" ] && kill -0 "$$(cat "$$RUN/${process}.pid")" 2>/dev/null; then
  echo "${process} already running (pid $$(cat "$$RUN/${process}.pid"))" >&2
  exit 1
fi
nohup ${command} --kit "$$KIT" "$$@" >>"$$RUN/${process}.log" 2>&1 &
PID=$$!
echo "$$PID" >"$$RUN/${process}.pid"
# A kit that fails its signature check, or a port in use, ends it at once: say so here.
sleep 1
if ! kill -0 "$$PID" 2>/dev/null; then
  rm -f "$$RUN/${process}.pid"
  echo "${what} did not start; the end of $$RUN/${process}.log:" >&2
  tail -n 5 "$$RUN/${process}.log" >&2
  exit 1
fi
# A relay, and a site with connect: listen, serve on their port; a site that dials out
# (connect: outbound in local/site.yaml, the default) opens no port at all.
REACHED="listening on port ${port}"
if [ -f "$$KIT/local/site.yaml" ] && ! grep -Eq '^connect:[[:space:]]*listen[[:space:]]*$$' "$$KIT/local/site.yaml"; then
  REACHED='dialling out to the relays ${relays}'
fi
echo "${what} started (pid $$PID), $$REACHED; log: $$RUN/${process}.log"
