#!/usr/bin/env bash
# Set up .venv (idempotent) and run the whole test suite, slow end-to-end tests included.
#   scripts/test.sh              everything (what CI runs)
#   scripts/test.sh --fast       skip the tests marked slow
#   scripts/test.sh -k prune     any other arguments go to pytest
# Tests run on one pytest-xdist worker per usable core (at most 4; MTPRUNE_TEST_WORKERS=1 for one process):
# most of a test's time is one single-threaded process (a CLI call, a tiny fairseq run), so two workers on
# two cores nearly halve the wall time. Tests that share a module-scoped fixture stay on one worker.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
# the report page's tests drive Debian's chromium through chromedriver: installed here when missing and allowed
# (root with apt-get); without them those tests are skipped, saying why
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing chromium and chromium-driver for the report page's tests"
    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver) \
      >"$root/.venv/apt.log" 2>&1 || echo "test.sh: could not install chromium (see .venv/apt.log); its tests will be skipped"
  fi
fi
marker=(-m "slow or not slow")
if [ "${1:-}" = "--fast" ]; then marker=(-m "not slow"); shift; fi
set +e
workers="${MTPRUNE_TEST_WORKERS:-auto}"
xdist=(-n "$workers" --dist loadgroup)
[ "$workers" = auto ] && xdist+=(--maxprocesses 4)
[ "$workers" = 1 ] && xdist=(-p no:xdist)
.venv/bin/python -m pytest --durations=25 "${xdist[@]}" "${marker[@]}" "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$code"
