#!/usr/bin/env bash
# Runs the site agent of ${site} (project ${project}) in a container, in the foreground;
# Ctrl-C or `docker stop flare-agent-<site>` stops it cleanly. Arguments go to
# `flare-agent start`, e.g. --log-level DEBUG.
#
# What the container sees (the image's contract):
#   /kit/startup, /kit/local  this kit, read-only (startup/ is signed and verified at start)
#   /data                     DATA_DIR, read-only: the site's data (default: the kit's data/)
#   /work                     WORK_DIR: deployed apps, task state and results (default: the
#                             kit's work/); keep it across restarts, results wait there
#                             until the server has them
# Keep data_dir: data and work_dir: work in local/site.yaml: in the container they are
# /data and /work. Choose the host folders with DATA_DIR and WORK_DIR instead.
#
# Other settings, from the environment:
#   FLARE_AGENT_IMAGE  image to run (default: the kit's)
#   GPUS               "all", a docker --gpus value such as '"device=0,1"', or "none";
#                      default: all when nvidia-smi works here, else none
#   BIND_ADDRESS       with connect: listen in local/site.yaml, the host address to publish
#                      port ${port} on (default: every address; Docker's port rules bypass
#                      host firewalls such as ufw, so prefer the address the Airflow workers
#                      reach). With connect: outbound (the default) nothing is published:
#                      the agent dials out to the relays and listens on no port.
#   SHM_SIZE           shared memory for PyTorch's data loaders (default 2g)
#   RUN_AS             uid:gid the agent runs as (default: the owner of the kit's key)
set -euo pipefail

SITE='${site}'
PORT='${port}'
KIT="$$(cd "$$(dirname "$${BASH_SOURCE[0]}")/.." && pwd)"
KEY="$$KIT/startup/$$SITE.key"
DEFAULT_IMAGE='${docker_image}'
IMAGE="$${FLARE_AGENT_IMAGE:-$$DEFAULT_IMAGE}"
DATA_DIR="$${DATA_DIR:-$$KIT/data}"
WORK_DIR="$${WORK_DIR:-$$KIT/work}"
SHM_SIZE="$${SHM_SIZE:-2g}"

fail() {
  echo "error: $$*" >&2
  exit 1
}

# The agent runs as the kit's owner: it can read the private key (mode 0600) and write
# WORK_DIR, and never runs as root.
[ -f "$$KEY" ] || fail "$$KEY is missing: is $$KIT the kit of $$SITE?"
RUN_AS="$${RUN_AS:-$$(stat -c %u:%g "$$KEY" 2>/dev/null || stat -f %u:%g "$$KEY")}"
if [ "$${RUN_AS%%:*}" = 0 ]; then
  fail "the kit belongs to root, so the agent would run as root; hand it to the user that runs the agent (chown -R USER: $$KIT) or set RUN_AS=uid:gid"
fi
[ -d "$$DATA_DIR" ] || fail "data folder $$DATA_DIR does not exist; set DATA_DIR to the folder with $$SITE's data"
if [ ! -d "$$WORK_DIR" ]; then
  mkdir -p "$$WORK_DIR"
  if [ "$$(id -u)" = 0 ]; then chown "$$RUN_AS" "$$WORK_DIR"; fi
fi
if ! grep -Eq '^data_dir:[[:space:]]*data[[:space:]]*$$' "$$KIT/local/site.yaml" ||
  ! grep -Eq '^work_dir:[[:space:]]*work[[:space:]]*$$' "$$KIT/local/site.yaml"; then
  echo "warning: local/site.yaml should say 'data_dir: data' and 'work_dir: work' for the container; other folders are not where DATA_DIR and WORK_DIR are mounted" >&2
fi

PORT_ARGS=()
if grep -Eq '^connect:[[:space:]]*listen[[:space:]]*$$' "$$KIT/local/site.yaml"; then
  PORT_ARGS=(--publish "$${BIND_ADDRESS:+$$BIND_ADDRESS:}$$PORT:$$PORT")
fi

GPU_ARGS=()
GPUS="$${GPUS:-auto}"
if [ "$$GPUS" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then GPUS=all; else GPUS=none; fi
fi
if [ "$$GPUS" = none ]; then
  GPU_ARGS=(--env NVIDIA_VISIBLE_DEVICES=void)
else
  GPU_ARGS=(--gpus "$$GPUS")
fi

exec docker run --rm --name "flare-agent-$${SITE//[^A-Za-z0-9_.-]/_}" \
  --user "$$RUN_AS" \
  --read-only --tmpfs /tmp \
  --cap-drop ALL --security-opt no-new-privileges \
  --shm-size "$$SHM_SIZE" \
  --stop-signal SIGTERM --stop-timeout 30 \
  "$${PORT_ARGS[@]}" \
  --volume "$$KIT/startup:/kit/startup:ro" \
  --volume "$$KIT/local:/kit/local:ro" \
  --volume "$$DATA_DIR:/data:ro" \
  --volume "$$WORK_DIR:/work" \
  "$${GPU_ARGS[@]}" \
  "$$IMAGE" start --kit /kit "$$@"
