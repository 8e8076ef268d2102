#!/usr/bin/env bash
# System packages the test suite needs beyond the two Python environments, from Debian:
#   chromium    the browser test of the Prefect UI (Playwright drives it; it never downloads one)
#   postgresql  the Prefect server on a real PostgreSQL (tests/test_prefect_postgres.py starts
#               its own throw-away cluster with initdb; nothing is started system-wide)
# Idempotent: installs only what is missing.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
export DEBIAN_FRONTEND=noninteractive
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages present: $(/usr/bin/chromium --version 2>/dev/null);" \
       "$(ls -d /usr/lib/postgresql/*/bin | head -n1)"
  exit 0
fi
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}
echo "installed: ${missing[*]}"
