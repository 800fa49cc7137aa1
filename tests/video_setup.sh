#!/usr/bin/env bash
# Make the ffmpeg/ffprobe binaries that tests/test_video.py (and `ssltrain shards video`) need present: installs
# Debian's ffmpeg package when either is missing, does nothing when both are there (safe to run every time).
# Run as root (CI) or as a user with sudo. Then `SSLTRAIN_REQUIRE_FFMPEG=1 pytest tests` fails, rather than skips,
# the video tests if ffmpeg is still missing.
set -euo pipefail

if command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1; then
    exit 0
fi
# Where it cannot install, the video tests skip (make test still passes) unless SSLTRAIN_REQUIRE_FFMPEG is set.
cannot_install() {
    echo "video_setup.sh: $1; the video tests will skip" >&2
    [ -z "${SSLTRAIN_REQUIRE_FFMPEG:-}" ]
    exit $?
}
if ! command -v apt-get >/dev/null 2>&1; then
    cannot_install "ffmpeg is missing and there is no apt-get: install ffmpeg with your package manager"
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if ! sudo -n true 2>/dev/null; then
        cannot_install "ffmpeg is missing and installing it needs root: sudo apt-get install ffmpeg"
    fi
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends ffmpeg
command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null
echo "video_setup.sh: installed $(ffmpeg -hide_banner -version | head -n 1)"
