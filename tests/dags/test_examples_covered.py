"""
Every DAG in dags/ is run (not just parsed) by some test.

The rule, kept simple on purpose: a test file under tests/ *runs* a DAG when

1. it declares the DAG id in a module-level literal set ``EXAMPLE_DAGS_RUN = {"dag_id", ...}``, and
2. it runs DAGs: it uses the ``run_dag`` fixture (or ``run_dag_test``), or calls ``<dag>.test(...)``
   or a stack's ``.trigger(...)``.

Adding a DAG file to dags/ therefore needs a test that runs it and names it in that set; a set
naming a DAG id that dags/ does not define (a renamed or deleted DAG) fails too. The files are
read with ``ast``, never imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"
TESTS = ROOT / "tests"
MARKER = "EXAMPLE_DAGS_RUN"
#: Names whose use means "this file runs a DAG": the fixture, its helper, dag.test(), stack.trigger().
RUNNER_NAMES = frozenset({"run_dag", "run_dag_test"})
RUNNER_METHODS = frozenset({"test", "trigger"})


def declared_runs(source: str, filename: str = "<test file>") -> set[str]:
    """
    The DAG ids a test file's module-level ``EXAMPLE_DAGS_RUN`` names, if it also runs DAGs.

    Raises ``ValueError`` when the set is not a literal set of strings, or when the file declares
    it but never runs a DAG (so a declaration alone proves nothing).
    """
    tree = ast.parse(source, filename)
    declared: set[str] | None = None
    for node in tree.body:
        if not isinstance(node, ast.Assign | ast.AnnAssign) or node.value is None:
            continue
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if not any(isinstance(t, ast.Name) and t.id == MARKER for t in targets):
            continue
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            value = None
        if not isinstance(value, set) or not all(isinstance(item, str) for item in value):
            raise ValueError(f"{filename}: {MARKER} must be a literal set of DAG ids, like {{'my_dag'}}")
        declared = value
    if declared is None:
        return set()
    if not _runs_dags(tree):
        raise ValueError(
            f"{filename} declares {MARKER} = {sorted(declared)} but runs no DAG "
            "(no run_dag fixture, no .test(...), no stack .trigger(...))"
        )
    return declared


def _runs_dags(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in RUNNER_NAMES:
            return True
        if isinstance(node, ast.arg) and node.arg in RUNNER_NAMES:
            return True
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in RUNNER_METHODS
        ):
            return True
    return False


def runs_by_file(tests: Path = TESTS) -> dict[str, set[str]]:
    """Declared DAG ids per test file (relative path), for the files that declare any."""
    runs = {}
    for path in sorted(tests.rglob("*.py")):
        declared = declared_runs(path.read_text(encoding="utf-8"), str(path.relative_to(tests.parent)))
        if declared:
            runs[str(path.relative_to(tests.parent))] = declared
    return runs


@pytest.fixture(scope="module")
def dag_ids_by_file() -> dict[str, set[str]]:
    """The DAG ids each file of dags/ defines, as Airflow parses them."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    by_file: dict[str, set[str]] = {path.name: set() for path in DAGS.glob("*.py")}
    for dag_id, dag in bag.dags.items():
        by_file.setdefault(Path(dag.fileloc).name, set()).add(dag_id)
    return by_file


@pytest.mark.airflow
def test_every_dag_in_dags_is_run_by_a_test(dag_ids_by_file):
    without_dag = sorted(name for name, ids in dag_ids_by_file.items() if not ids)
    assert not without_dag, f"files in dags/ that define no DAG: {without_dag}"
    defined = set().union(*dag_ids_by_file.values())
    run = set().union(*runs_by_file().values())
    not_run = sorted(defined - run)
    assert not not_run, (
        f"DAGs in dags/ that no test runs: {not_run}. Run each in a test (run_dag / dag.test()) and "
        f"name it in that file's module-level {MARKER} = {{...}}"
    )
    unknown = sorted(run - defined)
    assert not unknown, f"{MARKER} names DAG ids that dags/ does not define: {unknown}"


# -- the rule itself ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('EXAMPLE_DAGS_RUN = {"a", "b"}\ndef test_x(run_dag):\n    run_dag(dag)\n', {"a", "b"}),
        ('EXAMPLE_DAGS_RUN = {"a"}\ndag.test(run_conf={})\n', {"a"}),
        ('EXAMPLE_DAGS_RUN = {"a"}\ndef test_x(airflow_stack):\n    stack.trigger("a")\n', {"a"}),
        ('EXAMPLE_DAGS_RUN = {"a"}\nhelper(run_dag, dag)\n', {"a"}),  # the fixture passed on
        ('def test_x(run_dag):\n    run_dag(dag)  # "a" is run, but not declared\n', set()),
        ('def f():\n    EXAMPLE_DAGS_RUN = {"a"}\n    run_dag(dag)\n', set()),  # not module level
    ],
)
def test_what_counts_as_running_a_dag(source, expected):
    assert declared_runs(source) == expected


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ('EXAMPLE_DAGS_RUN = {"a"}\nDagBag(dag_folder="dags")\n', r"runs no DAG"),
        ("EXAMPLE_DAGS_RUN = {DAG_ID}\nrun_dag(dag)\n", r"must be a literal set"),
        ('EXAMPLE_DAGS_RUN = ["a"]\nrun_dag(dag)\n', r"must be a literal set"),
    ],
)
def test_a_declaration_that_proves_nothing_is_an_error(source, match):
    with pytest.raises(ValueError, match=match):
        declared_runs(source)


def test_the_check_collects_declarations_from_every_test_file(tmp_path):
    (tmp_path / "tests" / "deep").mkdir(parents=True)
    (tmp_path / "tests" / "test_one.py").write_text('EXAMPLE_DAGS_RUN = {"a"}\nrun_dag(d)\n')
    (tmp_path / "tests" / "deep" / "test_two.py").write_text('EXAMPLE_DAGS_RUN = {"b", "c"}\nd.test()\n')
    (tmp_path / "tests" / "test_three.py").write_text("run_dag(d)\n")
    assert runs_by_file(tmp_path / "tests") == {
        "tests/test_one.py": {"a"},
        "tests/deep/test_two.py": {"b", "c"},
    }
