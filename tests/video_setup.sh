#!/usr/bin/env bash
# Make the ffmpeg/ffprobe binaries that tests/test_video.py (and `ssltrain shards video`) need present: installs
# Debian's ffmpeg package when either is missing. Then `SSLTRAIN_REQUIRE_FFMPEG=1 pytest tests` fails, rather than
# skips, the video tests if ffmpeg is still missing.
set -euo pipefail
exec bash "$(dirname "$0")/apt_install.sh" ffmpeg "ffmpeg ffprobe" SSLTRAIN_REQUIRE_FFMPEG "the video tests"
