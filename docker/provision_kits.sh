#!/usr/bin/env bash
# One-shot provisioning for docker/compose.yaml (its flare-provision service).
#
# Issues the federation's kits from FLARE_PROJECT_FILE into FLARE_WORKSPACE once (the
# workspace keeps the root CA: later runs reuse it), then publishes each kit into the
# volumes compose mounts under FLARE_KITS:
#   a site    FLARE_KITS/<site>/startup and FLARE_KITS/<site>/local, the two volumes its
#             agent mounts read-only at /kit/startup and /kit/local, owned by the agent's
#             user. Published once: local/site.yaml is the site's to edit.
#   a server  FLARE_KITS/<server> (airflow-init imports its startup/connections.json),
#             owned by Airflow's user, refreshed on every run so added sites reach Airflow.
# Kits without a folder under FLARE_KITS (admins) stay in the workspace. A folder naming
# a site that has no kit yet is issued with `flare provision --add-site`.
set -euo pipefail
shopt -s nullglob

PROJECT_FILE="${FLARE_PROJECT_FILE:-/opt/flare/project.yml}"
WORKSPACE="${FLARE_WORKSPACE:-/workspace}"
KITS="${FLARE_KITS:-/kits}"
AGENT_OWNER="${FLARE_AGENT_OWNER:-10001:10001}"
SERVER_OWNER="${FLARE_SERVER_KIT_OWNER:-50000:0}"

latest_prod() {
  find "$WORKSPACE" -mindepth 2 -maxdepth 2 -type d -name 'prod_*' | sort -V | tail -n 1
}

clear_folder() {
  find "$1" -mindepth 1 -delete
}

publish_site() {
  local kit="$1" dest="$2"
  if [ -e "$dest/startup/signature.json" ]; then
    echo "$(basename "$kit"): kit already published in $dest; kept"
    return
  fi
  mkdir -p "$dest/startup" "$dest/local"
  clear_folder "$dest/startup"
  clear_folder "$dest/local"
  cp -a "$kit/local/." "$dest/local/"
  # signature.json goes last: its presence means the kit was published whole.
  find "$kit/startup" -mindepth 1 -maxdepth 1 ! -name signature.json -exec cp -a {} "$dest/startup/" \;
  chown -R "$AGENT_OWNER" "$dest/startup" "$dest/local"
  cp -a "$kit/startup/signature.json" "$dest/startup/"
  chown "$AGENT_OWNER" "$dest/startup/signature.json"
  echo "$(basename "$kit"): site kit published to $dest (owner $AGENT_OWNER)"
}

publish_server() {
  local kit="$1" dest="$2"
  clear_folder "$dest"
  cp -a "$kit/." "$dest/"
  chown -R "$SERVER_OWNER" "$dest"
  echo "$(basename "$kit"): kit published to $dest (owner $SERVER_OWNER)"
}

if [ ! -f "$PROJECT_FILE" ]; then
  echo "error: project file $PROJECT_FILE not found (set FLARE_PROJECT_FILE)" >&2
  exit 2
fi
mkdir -p "$WORKSPACE"
prod="$(latest_prod)"
if [ -z "$prod" ]; then
  flare provision -p "$PROJECT_FILE" -w "$WORKSPACE"
  prod="$(latest_prod)"
fi

added=()
for dest in "$KITS"/*/; do
  name="$(basename "$dest")"
  [ -d "$prod/$name" ] || added+=(--add-site "$name")
done
if [ "${#added[@]}" -gt 0 ]; then
  flare provision -p "$PROJECT_FILE" -w "$WORKSPACE" "${added[@]}"
  prod="$(latest_prod)"
fi

for kit in "$prod"/*/; do
  kit="${kit%/}"
  dest="$KITS/$(basename "$kit")"
  [ -d "$dest" ] || continue
  if [ -f "$kit/startup/agent.json" ]; then
    publish_site "$kit" "$dest"
  else
    publish_server "$kit" "$dest"
  fi
done
