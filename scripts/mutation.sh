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
# test or explained in dev/mutation.md.
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
sample() { mutmut results --all true 2>/dev/null | "$VENV/bin/python" scripts/mutation_results.py sample "$1" "${SEED:-1}"; }

started=$(date +%s)
if [[ -n ${SAMPLE:-} ]]; then
    if [[ ! -d mutants ]]; then
        # Nothing to sample from yet: a run naming no mutant generates them all (and maps the tests
        # to them), then stops at "none match any mutant key" without testing any.
        mutmut run --max-children "${MUTMUT_CHILDREN:-2}" generate.only.x_none__mutmut_0 >/dev/null 2>&1 || true
    fi
    mapfile -t picked < <(sample "$SAMPLE")
    printf '%s\n' "${picked[@]}" >mutants/picked.txt
    echo "== testing ${#picked[@]} mutant(s) picked at random"
    mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "${picked[@]}" || true
    # Their first verdicts, frozen now: the sample's own table, an estimate without bias.
    mutmut results --all true | "$VENV/bin/python" scripts/mutation_results.py freeze mutants/picked.txt mutants/sample-verdicts.txt
    if ((${#earlier[@]})); then
        echo "== testing again the ${#earlier[@]} mutant(s) that survived the previous run"
        mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "${earlier[@]}" || true
    fi
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
"$VENV/bin/python" scripts/mutation_results.py table "$THRESHOLD" mutants/sample-verdicts.txt <mutants/results.txt
