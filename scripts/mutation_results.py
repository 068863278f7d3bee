"""
Read ``mutmut results --all true`` from standard input, for ``scripts/mutation.sh``.

    python scripts/mutation_results.py table THRESHOLD [SAMPLED]
        the table per module (and another of the mutants listed in SAMPLED); exit 1 below the rate
    python scripts/mutation_results.py sample N SEED
        N untested mutants per module, at random
"""

import collections
import random
import re
import sys
from pathlib import Path

LINE = re.compile(r"\s*(?P<name>(?P<module>\S+?)\.x[_\u01c1]\S*__mutmut_\d+): (?P<status>.+)$")
CAUGHT = {"killed", "timeout", "caught by type check"}
UNTESTED = {"not checked"}


def _by_module(lines) -> dict[str, list[tuple[str, str]]]:
    """(mutant name, status) pairs per module."""
    rows: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for line in lines:
        match = LINE.match(line)
        if match:
            rows[match["module"]].append((match["name"], match["status"].strip()))
    return rows


def _figures(counts: collections.Counter) -> tuple[int, int, int, float]:
    """Mutants, tested, caught, and the kill rate among the tested (a survivor, or a mutant no
    test covers, counts against it)."""
    n = sum(counts.values())
    tested = n - sum(counts[status] for status in UNTESTED)
    caught = sum(counts[status] for status in CAUGHT)
    return n, tested, caught, caught / tested if tested else 0.0


def _row(name: str, counts: collections.Counter) -> str:
    n, tested, caught, rate = _figures(counts)
    return f"{name:<36} {n:>8} {tested:>7} {caught:>7} {tested - caught:>9} {rate:>10.1%}"


def _table(by_module: dict[str, list[tuple[str, str]]]) -> collections.Counter:
    """Print one row per module and the total; return the total's counts."""
    total: collections.Counter = collections.Counter()
    print(f"{'module':<36} {'mutants':>8} {'tested':>7} {'killed':>7} {'survived':>9} {'kill rate':>10}")
    for module, mutants in sorted(by_module.items()):
        counts = collections.Counter(status for _, status in mutants)
        total.update(counts)
        print(_row(module, counts))
    print(_row("all", total))
    return total


def table(lines, threshold: float, sampled: set[str] = frozenset()) -> int:
    """
    Print the verdicts per module; tell whether the threshold is met.

    ``sampled`` names the mutants ever picked at random (``SAMPLE=N``): they get a table of their
    own, an estimate free of the cheapest-first order in which mutmut tests the rest.
    """
    by_module = _by_module(lines)
    total = _table(by_module)
    print("statuses:", ", ".join(f"{n} {status}" for status, n in sorted(total.items())))
    picked = {m: [row for row in rows if row[0] in sampled] for m, rows in by_module.items()}
    if any(picked.values()):
        print("\nof which picked at random (SAMPLE):")
        _table({m: rows for m, rows in picked.items() if rows})
    print("survivors: `mutmut results`, `mutmut show <name>`; each killed by a test or in docs/mutation.md")
    return 0 if _figures(total)[3] >= threshold else 1


def sample(lines, per_module: int, seed: int) -> int:
    """Print ``per_module`` untested mutant names per module, picked at random."""
    random.seed(seed)
    for mutants in _by_module(lines).values():
        untested = [name for name, status in mutants if status in UNTESTED]
        for name in random.sample(untested, min(len(untested), per_module)):
            print(name)
    return 0


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "table":
        listed = Path(args[1]) if len(args) > 1 else None
        sampled = set(listed.read_text().split()) if listed and listed.exists() else set()
        sys.exit(table(sys.stdin, float(args[0]), sampled))
    sys.exit(sample(sys.stdin, int(args[0]), int(args[1])))
