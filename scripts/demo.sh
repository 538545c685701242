#!/usr/bin/env bash
# Set up .venv (idempotent) and run the full sweep on the built-in demo config: the synthetic
# corpus, offline, on CPU (its time on a 2-core machine: README, Set-up). Extra arguments go to `mtprune sweep`,
# e.g. scripts/demo.sh --run-dir /tmp/demo
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
exec .venv/bin/mtprune sweep -c configs/demo.yaml "$@"
