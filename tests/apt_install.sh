#!/usr/bin/env bash
# Install a Debian package when one of its binaries is missing; do nothing when all are there (safe to run every
# time). Used by video_setup.sh (ffmpeg) and servers_setup.sh (nginx). Run as root (CI) or as a user with sudo.
# Where it cannot install, the tests that need the package skip (make test still passes) unless REQUIRE_VAR is set.
#   apt_install.sh PACKAGE "BINARY..." REQUIRE_VAR "WHICH TESTS"
set -euo pipefail
package=$1 binaries=$2 require_var=$3 tests=$4

missing=0
for binary in $binaries; do
    command -v "$binary" >/dev/null 2>&1 || [ -x "/usr/sbin/$binary" ] || missing=1
done
[ "$missing" -eq 0 ] && exit 0
cannot_install() {
    echo "apt_install.sh: $1; $tests will skip" >&2
    [ -z "${!require_var:-}" ]
    exit $?
}
if ! command -v apt-get >/dev/null 2>&1; then
    cannot_install "$package is missing and there is no apt-get: install $package with your package manager"
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if ! sudo -n true 2>/dev/null; then
        cannot_install "$package is missing and installing it needs root: sudo apt-get install $package"
    fi
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "$package"
for binary in $binaries; do
    command -v "$binary" >/dev/null 2>&1 || [ -x "/usr/sbin/$binary" ]
done
