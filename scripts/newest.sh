#!/usr/bin/env bash
# Run the test suite against the newest releases that pyproject.toml's ranges allow, on purpose.
#
#   bash scripts/newest.sh            # fresh venv, no constraints: newest transformers, accelerate, lightning, ...
#   bash scripts/newest.sh --lock     # the same, then rewrite constraints/test.txt if the suite passed
#
# torch stays at $TORCH (default 2.13.0, the CPU build this project's machines install from disk; an
# unpinned torch pulls a multi-GB CUDA build). Extra pytest arguments go after `--`:
#   bash scripts/newest.sh -- tests/test_transformers.py -x
set -euo pipefail
cd "$(dirname "$0")/.."
lock=0
if [[ "${1:-}" == "--lock" ]]; then lock=1; shift; fi
[[ "${1:-}" == "--" ]] && shift
venv=$(mktemp -d)/venv
python -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
pip install -q --upgrade pip
pip install -q --upgrade --upgrade-strategy eager "torch==${TORCH:-2.13.0}" -e '.[test]'
echo "newest releases installed:"
python - <<'PY'
from importlib.metadata import version
for name in ("torch", "numpy", "scipy", "tensorboard", "lightning", "transformers", "accelerate", "pytest", "hypothesis"):
    print(f"  {name} {version(name)}")
PY
python -m pytest -q "$@"
if (( lock )); then
    {
        sed -n '1,4p' constraints/test.txt
        pip freeze --exclude-editable | sed 's/^\(torch==[^+]*\)+.*$/\1/'
    } > constraints/test.txt.new
    mv constraints/test.txt.new constraints/test.txt
    echo "constraints/test.txt rewritten from this venv"
fi
