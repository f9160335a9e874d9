#!/usr/bin/env bash
# The tests on a fresh machine, after scripts/quickstart.sh and nothing else: install the test
# tools (PyTorch and transformers for parity, the server's extra, the deviceless-compile
# extra), lint, then run pytest. Arguments go to pytest, so
#
#   bash scripts/test.sh                  # everything (what .ci/run runs)
#   bash scripts/test.sh -m "not slow"    # the fast tier
#
# pytest's exit status is the script's; "no tests collected" (5) is a failure, not a pass.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e '.[test,aot]'
python3 -m ruff check .
status=0
python3 -m pytest -q -n "${CDE_TEST_WORKERS:-2}" "$@" || status=$?
if [[ $status -eq 5 ]]; then
  echo "scripts/test.sh: pytest collected no tests (arguments: $*)" >&2
fi
exit "$status"
