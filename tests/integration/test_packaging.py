"""
The wheel users install: it holds the provider and its simulator, not the maintainers' tools, and
it declares every distribution its modules import.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: What a shipped module may import without declaring it: pytest loads the pytest plugin itself.
LOADED_BY_THEIR_HOST = {"imagecb_provider/testing/pytest_plugin.py": {"pytest"}}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """Build the provider's wheel as ``make wheel`` does."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("airflow_provider_imagecb-*.whl")
    return zipfile.ZipFile(path)


def _modules(wheel: zipfile.ZipFile) -> dict[str, str]:
    return {name: wheel.read(name).decode() for name in wheel.namelist() if name.endswith(".py")}


def test_the_wheel_ships_the_provider_and_the_simulator_only(wheel):
    names = wheel.namelist()
    assert not [n for n in names if "/stack/" in n or n.startswith(("imagecb_dev", "tests/", "benchmarks/"))]
    for shipped in (
        "imagecb_provider/hooks/imagecb.py",
        "imagecb_provider/operators/generate.py",
        "imagecb_provider/sensors/task.py",
        "imagecb_provider/triggers/task.py",
        "imagecb_provider/decorators/imagecb.py",
        "imagecb_provider/links.py",
        "imagecb_provider/plugin.py",
        "imagecb_provider/callbacks/receiver.py",
        "imagecb_provider/callbacks/migrations/versions/0001_create_imagecb_callback_tables.py",
        "imagecb_provider/ui/router.py",
        "imagecb_provider/testing/simulator/app.py",
    ):
        assert shipped in names
    assert not [source for source in _modules(wheel).values() if "imagecb_dev" in source]


def _requirements(wheel: zipfile.ZipFile) -> set[str]:
    """Every distribution the wheel's metadata names, extras included, normalized."""
    (meta,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    message = Parser().parsestr(wheel.read(meta).decode())
    names = {re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0] for r in message.get_all("Requires-Dist") or []}
    return {re.sub(r"[-_.]+", "-", n).lower() for n in names}


def _imports(source: str) -> set[str]:
    """The absolute module names a source imports, at any depth (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_every_imported_distribution_is_declared(wheel):
    declared = _requirements(wheel)
    owners = packages_distributions()
    missing = set()
    for path, source in _modules(wheel).items():
        for module in _imports(source) - {"__future__"}:
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top == "imagecb_provider":
                continue
            if top in LOADED_BY_THEIR_HOST.get(path, ()):
                continue
            if module.startswith("airflow.providers."):
                parts = module.split(".")  # airflow.providers.<name>, or airflow.providers.common.<name>
                name = "-".join(parts[2:4] if parts[2] == "common" else parts[2:3])
                wanted = {"apache-airflow-providers-" + name.replace("_", "-")}
            elif top == "airflow":
                wanted = {"apache-airflow"}
            else:
                wanted = {re.sub(r"[-_.]+", "-", d).lower() for d in owners.get(top, [top])}
            if not wanted & declared:
                missing.add(f"{path} imports {module} ({' or '.join(sorted(wanted))})")
    assert not missing, "\n".join(sorted(missing))


def test_the_metadata_points_at_no_local_address(wheel):
    (meta,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    urls = [line for line in wheel.read(meta).decode().splitlines() if line.startswith("Project-URL")]
    assert not [u for u in urls if re.search(r"localhost|127\.0\.0\.1", u)]
