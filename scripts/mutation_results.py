"""
Read ``mutmut results --all true`` from standard input, for ``scripts/mutation.sh``.

    python scripts/mutation_results.py table THRESHOLD [SAMPLE_VERDICTS]
        the table per module, and another of the random sample's first verdicts; exit 1 below the rate
    python scripts/mutation_results.py sample N SEED
        N untested mutants per module, at random
    python scripts/mutation_results.py freeze PICKED SAMPLE_VERDICTS
        append the first verdict of each mutant named in PICKED to SAMPLE_VERDICTS

Only a kill counts: a timeout is shown apart and counts against the kill rate, like a survivor,
since a mutant that merely slows the tests down was not caught by an assertion.
"""

import collections
import random
import re
import sys
from pathlib import Path

LINE = re.compile(r"\s*(?P<name>(?P<module>\S+?)\.x[_\u01c1]\S*__mutmut_\d+): (?P<status>.+)$")
KILLED = {"killed"}
TIMEOUT = {"timeout"}
UNTESTED = {"not checked"}


def _by_module(lines) -> dict[str, list[tuple[str, str]]]:
    """(mutant name, status) pairs per module."""
    rows: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for line in lines:
        match = LINE.match(line)
        if match:
            rows[match["module"]].append((match["name"], match["status"].strip()))
    return rows


def _figures(counts: collections.Counter) -> tuple[int, int, int, int, float]:
    """
    Return mutants, tested, killed, timed out, and the kill rate among the tested.

    :param counts: mutants per status; a survivor, a timeout or a mutant no test covers counts
        against the rate.
    """
    n = sum(counts.values())
    tested = n - sum(counts[status] for status in UNTESTED)
    killed = sum(counts[status] for status in KILLED)
    timeouts = sum(counts[status] for status in TIMEOUT)
    return n, tested, killed, timeouts, killed / tested if tested else 0.0


def _row(name: str, counts: collections.Counter) -> str:
    n, tested, killed, timeouts, rate = _figures(counts)
    survived = tested - killed - timeouts
    return f"{name:<36} {n:>8} {tested:>7} {killed:>7} {timeouts:>8} {survived:>9} {rate:>10.1%}"


def _table(by_module: dict[str, list[tuple[str, str]]]) -> collections.Counter:
    """Print one row per module and the total; return the total's counts."""
    total: collections.Counter = collections.Counter()
    print(
        f"{'module':<36} {'mutants':>8} {'tested':>7} {'killed':>7} {'timeout':>8} {'survived':>9} "
        f"{'kill rate':>10}"
    )
    for module, mutants in sorted(by_module.items()):
        counts = collections.Counter(status for _, status in mutants)
        total.update(counts)
        print(_row(module, counts))
    print(_row("all", total))
    return total


def table(lines, threshold: float, sample_verdicts: list[str] = ()) -> int:
    """
    Print the verdicts per module; tell whether the threshold is met.

    :param lines: ``mutmut results --all true``.
    :param threshold: the least kill rate over every tested mutant.
    :param sample_verdicts: the random sample's first verdicts (``SAMPLE=N``), frozen when its
        run ended: their table is an estimate free of the cheapest-first order in which mutmut
        tests the rest, and of tests written later against the sample's survivors.
    """
    total = _table(_by_module(lines))
    print("statuses:", ", ".join(f"{n} {status}" for status, n in sorted(total.items())))
    sample = _by_module(sample_verdicts)
    if sample:
        print("\nthe random sample, as first tested (not re-scored after new tests):")
        _table(sample)
    print("survivors: `mutmut results`, `mutmut show <name>`; each killed by a test or in dev/mutation.md")
    return 0 if _figures(total)[4] >= threshold else 1


def freeze(lines, picked: set[str], verdicts: Path) -> int:
    """
    Append the verdict of each picked mutant not frozen yet to ``verdicts``.

    :param lines: ``mutmut results --all true`` right after the sample's run.
    :param picked: the mutants the sample picked.
    :param verdicts: the file of first verdicts; a mutant already in it keeps its first verdict.
    """
    frozen = verdicts.read_text().splitlines() if verdicts.exists() else []
    known = {match["name"] for match in map(LINE.match, frozen) if match}
    with verdicts.open("a") as out:
        for line in lines:
            match = LINE.match(line)
            if match and match["name"] in picked - known and match["status"].strip() not in UNTESTED:
                out.write(line.rstrip("\n") + "\n")
    return 0


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
        frozen = Path(args[1]) if len(args) > 1 else None
        sys.exit(
            table(
                sys.stdin,
                float(args[0]),
                frozen.read_text().splitlines() if frozen and frozen.exists() else [],
            )
        )
    if command == "freeze":
        sys.exit(freeze(sys.stdin, set(Path(args[0]).read_text().split()), Path(args[1])))
    sys.exit(sample(sys.stdin, int(args[0]), int(args[1])))
