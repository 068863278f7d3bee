"""
``scripts/docs_snippets.py``: the code the docs show is the code of the example DAGs.

The real tree must pass ``--check``; copies of it in ``tmp_path`` show that the check fails on a
block that differs from its source, on a missing marker, a missing source and an unclosed block,
and that ``--write`` repairs a block.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "docs_snippets.py"
QUICKSTART_BLOCK = "<!-- [START include dags/imagecb_quickstart.py howto_quickstart] -->"


def run(*args: str, root: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the script as CI does, optionally on another root."""
    command = [sys.executable, str(SCRIPT), *args]
    if root is not None:
        command += ["--root", str(root)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def load_module():
    """Import the script as a module, for its functions."""
    spec = importlib.util.spec_from_file_location("docs_snippets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while being built
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the docs and the DAGs they include, its blocks filled from the copied DAGs."""
    for name in ("README.md", "CONTRIBUTING.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copytree(ROOT / "dags", tmp_path / "dags", ignore=shutil.ignore_patterns("__pycache__"))
    # Filled from the copied sources, so these tests do not depend on the real tree being in sync
    # (test_the_real_tree_passes_the_check is about that).
    assert run("--write", root=tmp_path).returncode == 0
    return tmp_path


def test_the_real_tree_passes_the_check():
    result = run("--check")
    assert result.returncode == 0, result.stderr
    count = int(re.search(r"(\d+) include block\(s\) match", result.stdout).group(1))
    assert count >= 15  # every doc's includes were found, not none


def test_the_readme_shows_the_quickstart_dag_from_its_source():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert QUICKSTART_BLOCK in readme
    block = readme.split(QUICKSTART_BLOCK, 1)[1].split("<!-- [END include] -->", 1)[0]
    assert "def imagecb_quickstart():" in block
    assert "# [START" not in block  # nested markers are left out


def test_the_copy_passes_before_it_is_changed(tree):
    result = run("--check", root=tree)
    assert result.returncode == 0, result.stderr


def test_a_block_that_differs_from_its_source_fails_and_is_named(tree):
    readme = tree / "README.md"
    text = readme.read_text(encoding="utf-8")
    assert text.count('task_id="hero"') == 1
    readme.write_text(text.replace('task_id="hero"', 'task_id="villain"'), encoding="utf-8")

    result = run("--check", root=tree)

    assert result.returncode == 1
    assert "README.md:" in result.stderr
    assert "dags/imagecb_quickstart.py howto_quickstart differs from its source" in result.stderr
    assert "1 problem(s)" in result.stderr


def test_a_source_changed_under_a_block_fails(tree):
    dag = tree / "dags" / "imagecb_quickstart.py"
    text = dag.read_text(encoding="utf-8")
    assert text.count("poke_interval=5") == 1
    dag.write_text(text.replace("poke_interval=5", "poke_interval=7"), encoding="utf-8")

    result = run("--check", root=tree)

    assert result.returncode == 1
    assert "docs/operators.md:" in result.stderr
    assert "howto_sensor differs from its source" in result.stderr


@pytest.mark.parametrize("kind", ["START", "END"])
def test_a_missing_marker_fails_and_is_named(tree, kind):
    dag = tree / "dags" / "imagecb_quickstart.py"
    marker = f"    # [{kind} howto_sensor]\n"
    text = dag.read_text(encoding="utf-8")
    assert text.count(marker) == 1
    dag.write_text(text.replace(marker, ""), encoding="utf-8")

    result = run("--check", root=tree)

    assert result.returncode == 1
    assert f"marker '# [{kind} howto_sensor]' is missing" in result.stderr
    assert "docs/operators.md:" in result.stderr


def test_a_block_whose_source_file_is_missing_fails(tree):
    (tree / "dags" / "imagecb_taskflow.py").unlink()

    result = run("--check", root=tree)

    assert result.returncode == 1
    assert "dags/imagecb_taskflow.py: no such file" in result.stderr
    assert "docs/taskflow.md:" in result.stderr


def test_an_unclosed_block_fails(tree):
    page = tree / "docs" / "operators.md"
    text = page.read_text(encoding="utf-8")
    page.write_text(text.replace("<!-- [END include] -->", "", 1), encoding="utf-8")

    result = run("--check", root=tree)

    assert result.returncode == 1
    assert "docs/operators.md:" in result.stderr
    assert "is not closed" in result.stderr


def test_write_restores_a_block_from_its_source(tree):
    readme = tree / "README.md"
    original = readme.read_text(encoding="utf-8")
    readme.write_text(original.replace('task_id="hero"', 'task_id="villain"'), encoding="utf-8")

    written = run("--write", root=tree)

    assert written.returncode == 0, written.stderr
    assert "README.md" in written.stdout
    assert readme.read_text(encoding="utf-8") == original
    assert run("--check", root=tree).returncode == 0


def test_write_fills_an_empty_block(tree):
    page = tree / "docs" / "extra.md"
    page.write_text(
        "# Extra\n\n<!-- [START include dags/imagecb_quickstart.py howto_sensor] -->\n"
        "<!-- [END include] -->\n",
        encoding="utf-8",
    )
    assert run("--check", root=tree).returncode == 1

    assert run("--write", root=tree).returncode == 0

    text = page.read_text(encoding="utf-8")
    assert "```python\nsubmitted = ImageGenerateOperator(\n" in text
    assert run("--check", root=tree).returncode == 0


def test_extract_dedents_and_leaves_out_nested_markers_and_blank_edges(tmp_path):
    module = load_module()
    source = tmp_path / "example.py"
    source.write_text(
        "def f():\n"
        "    # [START howto_outer]\n"
        "\n"
        "    a = 1\n"
        "    # [START howto_inner]\n"
        "    if a:\n"
        "        b = 2\n"
        "    # [END howto_inner]\n"
        "\n"
        "    # [END howto_outer]\n",
        encoding="utf-8",
    )

    assert module.extract(source, "howto_outer", tmp_path) == "a = 1\nif a:\n    b = 2\n"
    assert module.extract(source, "howto_inner", tmp_path) == "if a:\n    b = 2\n"


def test_extract_refuses_a_marker_given_twice(tmp_path):
    module = load_module()
    source = tmp_path / "example.py"
    source.write_text("# [START howto_x]\na = 1\n# [END howto_x]\n# [START howto_x]\n# [END howto_x]\n")

    with pytest.raises(module.SnippetError, match="more than once"):
        module.extract(source, "howto_x", tmp_path)


def test_an_include_comment_inside_a_code_fence_is_an_example_not_a_block(tree):
    page = tree / "docs" / "extra.md"
    page.write_text(
        "# Extra\n\n```\n<!-- [START include dags/no_such_dag.py howto_nothing] -->\n"
        "<!-- [END include] -->\n```\n",
        encoding="utf-8",
    )
    assert run("--check", root=tree).returncode == 0

    page.write_text(page.read_text(encoding="utf-8").replace("```\n", ""), encoding="utf-8")
    result = run("--check", root=tree)
    assert result.returncode == 1
    assert "dags/no_such_dag.py: no such file" in result.stderr
