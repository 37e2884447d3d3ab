#!/usr/bin/env bash
# Hospitals example, deployed on 127.0.0.1: see examples/hospitals/README.md.
exec "$(dirname "${BASH_SOURCE[0]}")/../roles_loopback.sh" medical "${1:-hospitals-loopback}"
