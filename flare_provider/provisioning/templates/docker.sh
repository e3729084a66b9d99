#!/usr/bin/env bash
# Runs the site agent of ${site} in a container from image ${docker_image}.
# The kit is mounted read-only; set DATA_DIR to the folder with this site's data.
set -euo pipefail
KIT="$$(cd "$$(dirname "$${BASH_SOURCE[0]}")/.." && pwd)"
DATA_DIR="$${DATA_DIR:-$$KIT/data}"
GPU_ARGS=()
if command -v nvidia-smi >/dev/null 2>&1; then GPU_ARGS=(--gpus all); fi
mkdir -p "$$KIT/run"
exec docker run --rm --name "flare-agent-${site}" \
  "$${GPU_ARGS[@]}" \
  -p ${port}:${port} \
  -v "$$KIT/startup:/kit/startup:ro" \
  -v "$$KIT/local:/kit/local:ro" \
  -v "$$KIT/run:/kit/run" \
  -v "$$DATA_DIR:/data" \
  -e FLARE_DATA_DIR=/data \
  ${docker_image} flare-agent start --kit /kit "$$@"
