#!/usr/bin/env bash
# Satellite-sites example, deployed on 127.0.0.1: see examples/satellite-sites/README.md.
exec "$(dirname "${BASH_SOURCE[0]}")/../roles_loopback.sh" satellite "${1:-satellite-loopback}"
