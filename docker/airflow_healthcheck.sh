#!/usr/bin/env bash
# Health check of whichever Airflow component this container runs, for the image's
# HEALTHCHECK and compose's healthcheck: flare-airflow-healthcheck [COMPONENT]
#
# COMPONENT is api-server, scheduler, dag-processor, triggerer or worker (a Celery
# worker). Without it, the component is read from PID 1's command line (the official
# image runs "dumb-init -- /entrypoint <command>"; FLARE_PID1_CMDLINE names another file
# to read it from). One-shot commands have nothing to watch and count as healthy.
set -euo pipefail

component="${1:-}"
if [ -z "$component" ]; then
  mapfile -d '' -t pid1_args < "${FLARE_PID1_CMDLINE:-/proc/1/cmdline}"
  for arg in "${pid1_args[@]}"; do
    case "$arg" in
      api-server | scheduler | dag-processor | triggerer | worker) component="$arg" ;;
    esac
  done
fi

api_port="${AIRFLOW__API__PORT:-8080}"
scheduler_port="${AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT:-8974}"
case "$component" in
  api-server)
    exec curl --fail --silent --show-error --max-time 8 --output /dev/null "http://localhost:${api_port}/api/v2/version" ;;
  scheduler)
    # Needs [scheduler] enable_health_check = True.
    exec curl --fail --silent --show-error --max-time 8 --output /dev/null "http://localhost:${scheduler_port}/health" ;;
  dag-processor)
    exec airflow jobs check --job-type DagProcessorJob --local ;;
  triggerer)
    exec airflow jobs check --job-type TriggererJob --local ;;
  worker)
    exec celery --app airflow.providers.celery.executors.celery_executor.app inspect ping -d "celery@${HOSTNAME}" ;;
  "")
    exit 0 ;;
  *)
    echo "unknown Airflow component '$component' (use api-server, scheduler, dag-processor, triggerer or worker)" >&2
    exit 2 ;;
esac
