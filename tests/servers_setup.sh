#!/usr/bin/env bash
# Make the nginx binary that tests/test_store.py serves shards with (HTTP, range requests) present: installs Debian's
# nginx package when it is missing, does nothing when it is there (safe to run every time). moto's S3 server comes
# from pip (the dev extra). Run as root (CI) or as a user with sudo. Then `SSLTRAIN_REQUIRE_SERVERS=1 pytest tests`
# fails, rather than skips, the HTTP store tests if nginx is still missing.
set -euo pipefail

if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    exit 0
fi
# Where it cannot install, the HTTP store tests skip (make test still passes) unless SSLTRAIN_REQUIRE_SERVERS is set.
cannot_install() {
    echo "servers_setup.sh: $1; the HTTP store tests will skip" >&2
    [ -z "${SSLTRAIN_REQUIRE_SERVERS:-}" ]
    exit $?
}
if ! command -v apt-get >/dev/null 2>&1; then
    cannot_install "nginx is missing and there is no apt-get: install nginx with your package manager"
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if ! sudo -n true 2>/dev/null; then
        cannot_install "nginx is missing and installing it needs root: sudo apt-get install nginx"
    fi
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# The package's post-install starts a system nginx on port 80 where it can; the tests start their own, on loopback.
$SUDO apt-get install -y -qq --no-install-recommends nginx
[ -x /usr/sbin/nginx ]
echo "servers_setup.sh: installed $(/usr/sbin/nginx -v 2>&1)"
