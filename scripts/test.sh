#!/usr/bin/env bash
# Set up .venv (idempotent) and run the whole test suite, slow end-to-end tests included.
#   scripts/test.sh              everything (what CI runs)
#   scripts/test.sh --fast       skip the tests marked slow
#   scripts/test.sh -k prune     any other arguments go to pytest
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
marker=(-m "slow or not slow")
if [ "${1:-}" = "--fast" ]; then marker=(-m "not slow"); shift; fi
set +e
.venv/bin/python -m pytest --durations=25 "${marker[@]}" "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$code"
