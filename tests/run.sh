#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine (Python 3.11)
# and run every test. Used as-is by the README and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: Redis, PostgreSQL, nginx and Chromium for the real-part
# tests. Installed only when missing (apt-get needs root).
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v chromium >/dev/null || need+=(chromium)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v node >/dev/null || need+=(nodejs npm)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi

# Python packages: the project with its test and speed extras.
python3 -m pip install -q --disable-pip-version-check -e '.[test,fast]'

# Node packages: the official socket.io-client and playwright-core.
if [ -f tests/js/package.json ]; then
    (cd tests/js && npm install --no-audit --no-fund --silent)
fi

exec python3 -m pytest "$@"
