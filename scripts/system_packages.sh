#!/usr/bin/env bash
# Services the tests start for real (never mocked): PostgreSQL from Debian's `postgresql` package.
# Installed with apt-get where missing (as root, or with sudo); elsewhere a clear message says what to install.
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "PostgreSQL is missing and there is no apt-get: install PostgreSQL (initdb, pg_ctl) for the tests" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends postgresql
