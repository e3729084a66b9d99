#!/usr/bin/env bash
# Installs the system packages the test suite runs for real, when they are missing:
# openssl (certificate checks), PostgreSQL and Redis server binaries (the distributed
# Airflow harness starts its own instances of both), Chromium (the UI page test),
# tinyproxy (sites dialling out through an HTTP CONNECT proxy) and iproute2 (ss, ip).
set -euo pipefail
missing=()
command -v openssl >/dev/null || missing+=(openssl)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v chromium >/dev/null || missing+=(chromium)
command -v tinyproxy >/dev/null || [ -x /usr/bin/tinyproxy ] || missing+=(tinyproxy)
command -v ss >/dev/null || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing system packages: ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: ${missing[*]} missing and not root; install them with apt-get" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
