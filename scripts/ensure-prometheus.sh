#!/usr/bin/env bash
# Installs Debian's prometheus package (prometheus + promtool) when it is missing.
# The metrics tests start a real Prometheus; nothing is left running by this script.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null; then
  echo "prometheus is missing and this user cannot install it; the Prometheus tests will be skipped" >&2
  exit 0
fi
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# The Debian package starts a service where systemd runs; the tests start their own instance.
$SUDO systemctl stop prometheus 2>/dev/null || true
command -v promtool >/dev/null
