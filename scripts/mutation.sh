#!/usr/bin/env bash
# make mutation: mutmut over the modules listed in pyproject.toml ([tool.mutmut]), each mutant
# against the fast tests that cover it. Prints killed and survived per module, leaves mutmut's
# CI statistics in mutants/mutmut-cicd-stats.json, and fails below the 85 % kill rate.
#
#   bash scripts/mutation.sh              run (mutmut keeps the verdicts of unchanged code between runs)
#   FRESH=1 bash scripts/mutation.sh      start over: every mutant is generated and tested again
#   MUTMUT_CHILDREN=1 bash scripts/mutation.sh    mutants tested at once (default 2)
#   SAMPLE=40 bash scripts/mutation.sh    40 untested mutants per module at random (and the
#                                         survivors): an estimate in a fraction of a full run
#
# Survivors: `.venv/bin/mutmut results`, `.venv/bin/mutmut show <name>`; each one is killed by a
# test or explained in docs/mutation.md.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
THRESHOLD=0.85

# mutmut names a mutant after its file's path, dropping only a leading "src.": here that gives
# plugins.imagecb_provider.…, while the tests import the package as imagecb_provider (pytest's
# pythonpath = ["plugins"]), so no mutant would ever be switched on (mutmut stops: "none match
# any mutant key"). This runs mutmut with "plugins." dropped as well. Only the names it creates
# change: `mutmut results`, `mutmut show` and `mutmut export-cicd-stats` read them back as stored.
read -r -d '' LAUNCHER <<'PY' || true
import mutmut.__main__ as main
import mutmut.mutation.file_mutation as file_mutation
import mutmut.utils.format_utils as format_utils

mutant_name = format_utils.get_mutant_name


def get_mutant_name(relative_source_path, mutant_method_name):
    return mutant_name(relative_source_path, mutant_method_name).removeprefix("plugins.")


format_utils.get_mutant_name = main.get_mutant_name = file_mutation.get_mutant_name = get_mutant_name
main.cli(prog_name="mutmut")
PY
mutmut() { "$VENV/bin/python" -c "$LAUNCHER" "$@"; }

# Verdicts stored under the old names (a run without the launcher above) can never be updated.
if [[ -n ${FRESH:-} ]] || grep -rqs --include='*.meta' '"plugins\.imagecb_provider' mutants; then
    rm -rf mutants
fi

# mutmut keeps a verdict until the mutated function changes, so a test added since the last run
# would never meet the mutants that survived it: those are tested again after the run.
survivors() { [[ -d mutants ]] && mutmut results 2>/dev/null | sed -n 's/^ *\(.*\): survived$/\1/p' || true; }
mapfile -t earlier < <(survivors)

# SAMPLE=N: N mutants per module picked at random among those not tested yet (with the earlier
# survivors), for an estimate of each module's kill rate when a full run would take too long.
sample() {
    mutmut results --all true 2>/dev/null | "$VENV/bin/python" -c '
import collections, random, re, sys
by_module = collections.defaultdict(list)
for line in sys.stdin:
    match = re.match(r"\s*(\S+?)\.x[_\u01c1]\S*__mutmut_\d+: not checked$", line)
    if match:
        by_module[match[1]].append(line.split(":")[0].strip())
random.seed(int(sys.argv[2]))
for names in by_module.values():
    print("\n".join(random.sample(names, min(len(names), int(sys.argv[1])))))
' "$1" "${SEED:-1}"
}

started=$(date +%s)
if [[ -n ${SAMPLE:-} ]]; then
    mapfile -t picked < <(sample "$SAMPLE")
    echo "== testing ${#picked[@]} mutant(s) picked at random, and ${#earlier[@]} earlier survivor(s)"
    mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "${picked[@]}" "${earlier[@]}" || true
else
    mutmut run --max-children "${MUTMUT_CHILDREN:-2}" || true
    if ((${#earlier[@]})); then
        echo "== testing again the ${#earlier[@]} mutant(s) that survived the previous run"
        mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "${earlier[@]}" || true
    fi
fi
echo "== mutmut run: $(($(date +%s) - started)) s"

mutmut export-cicd-stats
mutmut results --all true >mutants/results.txt
"$VENV/bin/python" - mutants/results.txt "$THRESHOLD" <<'PY'
"""Print the per-module table of `mutmut results --all true`; exit 1 below the kill-rate threshold."""

import collections
import re
import sys

LINE = re.compile(r"\s*(?P<module>\S+?)\.x[_\u01c1]\S*__mutmut_\d+: (?P<status>.+)$")


CAUGHT = {"killed", "timeout", "caught by type check"}
UNTESTED = {"not checked"}


def main(path: str, threshold: float) -> int:
    """Count the verdicts per module, print them, and tell whether the threshold is met."""
    rows: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    with open(path, encoding="utf-8") as results:
        for line in results:
            match = LINE.match(line)
            if match:
                rows[match["module"]][match["status"].strip()] += 1
    total: collections.Counter = collections.Counter()
    print(f"{'module':<36} {'mutants':>8} {'tested':>7} {'killed':>7} {'survived':>9} {'kill rate':>10}")
    for module in sorted(rows):
        total.update(rows[module])
        print(_row(module, rows[module]))
    print(_row("all", total))
    print("statuses:", ", ".join(f"{n} {status}" for status, n in sorted(total.items())))
    print("survivors: `mutmut results`, `mutmut show <name>`; each is killed by a test or in docs/mutation.md")
    return 0 if _rate(total) >= threshold else 1


def _rate(counts: collections.Counter) -> float:
    """Caught among the mutants tested (a survivor, a mutant no test covers, count against)."""
    tested = sum(n for status, n in counts.items() if status not in UNTESTED)
    return sum(counts[status] for status in CAUGHT) / tested if tested else 0.0


def _row(name: str, counts: collections.Counter) -> str:
    n = sum(counts.values())
    tested = n - sum(counts[status] for status in UNTESTED)
    caught = sum(counts[status] for status in CAUGHT)
    return f"{name:<36} {n:>8} {tested:>7} {caught:>7} {tested - caught:>9} {_rate(counts):>10.1%}"


sys.exit(main(sys.argv[1], float(sys.argv[2])))
PY
