#!/usr/bin/env bash
# Services the tests start for real (never mocked): PostgreSQL from Debian's `postgresql` package,
# Debian's Chromium with its driver for the console's browser tests (a tool's own browser download fails on
# these machines), and Ceph's S3 gateway with a one-node cluster under it for `--artifacts s3://…`. Installed with apt-get where missing (as root, or with sudo); elsewhere a clear message
# says what to install.
set -euo pipefail
missing=()
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  missing+=(postgresql)
fi
if ! command -v chromium >/dev/null 2>&1; then
  missing+=(chromium)
fi
if ! command -v chromedriver >/dev/null 2>&1; then
  missing+=(chromium-driver)
fi
for daemon in ceph-mon ceph-osd radosgw; do
  if ! command -v "$daemon" >/dev/null 2>&1; then
    missing+=("$daemon")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "missing for the tests: ${missing[*]} (PostgreSQL's initdb and pg_ctl, Chromium and chromedriver, Ceph's monitor, OSD and S3 gateway); there is no apt-get" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
