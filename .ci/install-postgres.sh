#!/usr/bin/env bash
# Install what the PostgreSQL tests need: the server binaries (initdb, pg_ctl) from Debian's postgresql
# package. The tests start their own throwaway server (tests/postgres_cluster.py), as the 'postgres' user
# the package creates when they run as root; no system service is used. Idempotent and quiet: nothing is
# installed when the binaries are there.
# Usage: bash .ci/install-postgres.sh
set -euo pipefail

have_server() {
    command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

if ! have_server; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    echo "install-postgres: installing postgresql (apt)"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi

initdb=$(command -v initdb || ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n1)
echo "install-postgres: $("$initdb" --version)"
