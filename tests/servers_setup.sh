#!/usr/bin/env bash
# Make the nginx binary that tests/test_store.py serves shards with (HTTP, range requests) present: installs Debian's
# nginx package when it is missing (its post-install may start a system nginx on port 80; the tests start their own
# on loopback). moto's S3 server comes from pip (the dev extra). Then `SSLTRAIN_REQUIRE_SERVERS=1 pytest tests`
# fails, rather than skips, the HTTP store tests if nginx is still missing.
set -euo pipefail
exec bash "$(dirname "$0")/apt_install.sh" nginx nginx SSLTRAIN_REQUIRE_SERVERS "the HTTP store tests"
