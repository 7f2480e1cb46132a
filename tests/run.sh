#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine (Python 3.11)
# and run every test. Used as-is by the README and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: Redis, PostgreSQL, nginx and Chromium for the real-part
# tests, and a colour emoji font so emoji in the browser screenshots are not
# empty boxes. Installed only when missing (apt-get needs root).
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v chromium >/dev/null || need+=(chromium)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v node >/dev/null || need+=(nodejs npm)
dpkg -s fonts-noto-color-emoji >/dev/null 2>&1 || need+=(fonts-noto-color-emoji)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi

# Python packages: the project with its test and speed extras (Playwright's
# Python package among them; it drives the Debian Chromium installed above).
python3 -m pip install -q --disable-pip-version-check -e '.[test,fast]'

# Node packages: the official socket.io-client, for the JS client tests.
if [ -f tests/js/package.json ]; then
    (cd tests/js && npm install --no-audit --no-fund --silent)
fi

# Every test, then the core suite again against a throwaway PostgreSQL
# cluster (tests/kit/postgres.py), so both storage backends are held to the contract.
# Arguments go to both runs; the second is left out when the arguments
# pick tests (anything but options such as -q or -x).
pg_pass=1
for arg in "$@"; do
    case "$arg" in -*) ;; *) pg_pass=0 ;; esac
done
status=0
python3 -m pytest "$@" || status=$?
if [ $pg_pass -eq 1 ]; then
    POSTBOX_TEST_DB=postgres python3 -m pytest "$@" tests/test_core.py \
        tests/test_features.py tests/test_durability.py \
        tests/test_groups.py tests/test_search.py \
        tests/test_push_webhooks.py || status=$?
fi
exit $status
