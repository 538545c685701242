#!/usr/bin/env bash
# Create or refresh .venv with everything mtprune needs. Idempotent: a second run on a
# set-up machine only checks versions and returns in seconds.
#
#   MTPRUNE_TORCH_SPEC   torch requirement to install (default torch==2.13.0, the CPU build here;
#                        on a GPU cluster e.g. "torch==2.5.1" with --index-url through PIP_INDEX_URL)
#   MTPRUNE_PYTHON       interpreter used to create the venv (default python3.11, else python3)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

torch_spec="${MTPRUNE_TORCH_SPEC:-torch==2.13.0}"
fairseq_spec="fairseq-fixed==0.12.3.1"
py="${MTPRUNE_PYTHON:-$(command -v python3.11 || command -v python3)}"
venv="$root/.venv"
stamp="$venv/.mtprune-setup"
want="$torch_spec|$fairseq_spec|$(sha256sum pyproject.toml | cut -c1-16)"

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv with $py"
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import mtprune, fairseq, torch" 2>/dev/null; then
  echo "setup: .venv is up to date"
  exit 0
fi

# pip's own output (warnings about the machine's index settings, build logs) goes to a log file; a failing
# step prints its tail
log="$venv/setup.log"
: > "$log"
run_pip() {
  if ! "${pip[@]}" "$@" >>"$log" 2>&1; then
    echo "setup: 'pip $*' failed; the end of $log:" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
}
echo "setup: installing from the package index (pip's output: $log)"
run_pip install --upgrade "pip>=24" setuptools
# torch first: fairseq's build imports it, and without build isolation it must already be there.
"$venv/bin/python" -c "import torch" 2>/dev/null || run_pip install "$torch_spec"
run_pip install wheel cython numpy
if ! "$venv/bin/python" -c "import fairseq" 2>/dev/null; then
  echo "setup: building $fairseq_spec (about 3 minutes the first time; pip's cache makes it fast after)"
  run_pip install --no-build-isolation "$fairseq_spec"
fi
run_pip install --no-build-isolation -e ".[dev]"
echo "$want" > "$stamp"
echo "setup: .venv ready ($("$venv/bin/python" -c 'import torch, fairseq; print("torch", torch.__version__, "fairseq", fairseq.__version__)' 2>/dev/null))"
