#!/usr/bin/env bash
# `make test`: the suite in two phases, then its wall time against the suite's budget.
#   1. everything but the SLURM tier, in TEST_WORKERS pytest-xdist workers (each test module is one unit of
#      work, so its shared runs are trained once; TEST_WORKERS=0 runs in one process);
#   2. the SLURM tier (tests/slurm) in one process: its jobs share one cluster, and under the load of the
#      other phase a job was seen to finish without its logs, so it does not run beside anything.
# Arguments go to both phases (a path or -k that selects nothing in one phase is fine; nothing in both is
# pytest's exit status 5, a failure). Over budget is a loud warning, not a failure: machines are noisy.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BUDGET_S=900  # the whole suite on a 2-core CPU machine (CI's kind): 15 minutes
start=$(date +%s)

"$PY" -m pytest -n "${TEST_WORKERS:-2}" --dist loadgroup --no-loadscope-reorder -m "not gpu and not slow and not slurm" "$@"
first=$?
"$PY" -m pytest -m "slurm and not gpu and not slow" "$@"
second=$?

seconds=$(( $(date +%s) - start ))
echo "tests: ${seconds} s in all (budget ${BUDGET_S} s)"
if (( seconds > BUDGET_S )); then
  echo "WARNING: the tests took ${seconds} s, over the suite's budget of ${BUDGET_S} s ($(( BUDGET_S / 60 )) min)"
  echo "WARNING: see the slowest tests above, and tests/README.md"
fi
if (( first == 5 && second == 5 )); then exit 5; fi  # no test ran at all
(( first == 5 )) && first=0
(( second == 5 )) && second=0
exit $(( first != 0 ? first : second ))
