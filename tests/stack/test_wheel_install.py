"""
A stock deployment from the built wheel: a clean virtualenv holding only Airflow and the wheel
(with its declared dependencies and the ``simulator`` extra), no ``plugins/`` folder, no project
scripts, no ``PYTHONPATH``. Everything Airflow knows about the provider must come from the wheel's
entry points: the callback tables and the pool (``airflow db migrate``), the provider, its
connection type, its plugin, its task decorator, and the quick start DAG run against the simulator.

pip reaches the package registry (as ``make venv`` does), constrained to requirements.txt's pins;
every other request goes to loopback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.stack, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
AIRFLOW_VERSION = "3.3.2"
DIST_NAME = "airflow-provider-imagecb"
DAG_ID = "imagecb_quickstart"
POOL = "imagecb_submissions"
#: As ``make wheel``.
PIP_WHEEL = (sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
#: Variables of the calling environment that could leak the checkout or its settings in.
_LEAKY = ("AIRFLOW", "_AIRFLOW", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "IMAGECB")


@dataclass
class Deployment:
    venv: Path
    home: Path
    dags: Path
    env: dict[str, str]
    wheel: Path
    install_seconds: float

    @property
    def airflow(self) -> str:
        return str(self.venv / "bin" / "airflow")

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    @property
    def db(self) -> Path:
        return self.home / "airflow.db"


def _run(
    args: list[str], env: dict[str, str] | None, cwd: Path, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    began = time.monotonic()
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    print(f"\n$ {' '.join(args)}  -> exit {proc.returncode} in {time.monotonic() - began:.1f} s")
    if check and proc.returncode != 0:
        pytest.fail(
            f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


def _json_list(output: str) -> list[dict]:
    """The JSON list the CLI printed with ``-o json``, skipping any log line before it."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"^\s*\[", output, flags=re.MULTILINE):
        try:
            value, _ = decoder.raw_decode(output, match.end() - 1)
        except json.JSONDecodeError:
            continue
        if isinstance(value, list):
            return value
    raise AssertionError(f"no JSON list in the output:\n{output[-4000:]}")


def _constraints(target: Path) -> Path:
    """requirements.txt's pinned lines, without extras (constraints files may not carry them)."""
    pins = []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" not in line:
            continue
        name, version = line.split("==", 1)
        name = re.sub(r"\[.*\]", "", name).strip()
        pins.append(f"{name}=={version.strip()}")
    assert any(pin.startswith("apache-airflow==") for pin in pins), pins
    target.write_text("\n".join(pins) + "\n")
    return target


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    base = tmp_path_factory.mktemp("wheel-install")
    dist = base / "dist"
    _run(
        [*PIP_WHEEL, "--wheel-dir", str(dist), "."],
        env=None,
        cwd=ROOT,
    )
    wheels = sorted(dist.glob("airflow_provider_imagecb-*.whl"))
    assert len(wheels) == 1, wheels
    wheel = wheels[0]
    print(f"built {wheel.name}")

    env = {k: v for k, v in os.environ.items() if not k.startswith(_LEAKY)}
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], env=env, cwd=base)
    home, dags, plugins = base / "airflow-home", base / "dags", base / "plugins"
    for folder in (home, dags, plugins):
        folder.mkdir()
    shutil.copy(ROOT / "dags" / "imagecb_quickstart.py", dags / "imagecb_quickstart.py")
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(venv),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(dags),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(plugins),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
    )

    began = time.monotonic()
    _run(
        [
            str(venv / "bin" / "python"),
            *("-m", "pip", "install", "--quiet"),
            *("-c", str(_constraints(base / "constraints.txt"))),
            f"apache-airflow=={AIRFLOW_VERSION}",
            f"{DIST_NAME}[simulator] @ {wheel.as_uri()}",
        ],
        env=env,
        cwd=base,
        timeout=900,
    )
    install_seconds = time.monotonic() - began
    print(f"pip install of Airflow {AIRFLOW_VERSION} + {wheel.name}[simulator]: {install_seconds:.1f} s")

    deployed = Deployment(venv, home, dags, env, wheel, install_seconds)
    # nothing of the checkout is importable: the provider comes from the venv's site-packages
    where = _run(
        [deployed.python, "-c", "import imagecb_provider; print(imagecb_provider.__file__)"], env, cwd=base
    ).stdout.strip()
    print(f"imagecb_provider imported from {where}")
    assert Path(where).is_relative_to(venv), where
    assert not any(plugins.iterdir()), "the plugins folder must stay empty"

    migrate = _run([deployed.airflow, "db", "migrate"], env, cwd=base, timeout=600)
    print("\n".join(migrate.stdout.strip().splitlines()[-3:]))
    return deployed


def test_db_migrate_creates_the_callback_tables_and_the_pool(deployment: Deployment):
    with sqlite3.connect(deployment.db) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    print(f"imagecb tables: {sorted(t for t in tables if t.startswith('imagecb'))}")
    assert {"imagecb_callback", "imagecb_callback_cursor"} <= tables

    pools = _json_list(
        _run([deployment.airflow, "pools", "list", "-o", "json"], deployment.env, deployment.home).stdout
    )
    pool = next((p for p in pools if p.get("pool") == POOL), None)
    print(f"pool: {pool}")
    assert pool is not None, pools
    assert int(pool["slots"]) == 1


def test_the_provider_and_its_connection_type_are_registered(deployment: Deployment):
    providers = _json_list(
        _run([deployment.airflow, "providers", "list", "-o", "json"], deployment.env, deployment.home).stdout
    )
    ours = [p for p in providers if p.get("package_name") == DIST_NAME]
    print(f"providers list: {ours}")
    assert len(ours) == 1, [p.get("package_name") for p in providers]
    assert ours[0]["version"] in deployment.wheel.name

    hooks = _json_list(
        _run([deployment.airflow, "providers", "hooks", "-o", "json"], deployment.env, deployment.home).stdout
    )
    imagecb = [h for h in hooks if h.get("connection_type") == "imagecb"]
    print(f"providers hooks: {imagecb}")
    assert len(imagecb) == 1, [h.get("connection_type") for h in hooks]
    assert imagecb[0]["package_name"] == DIST_NAME
    assert imagecb[0]["class"] == "imagecb_provider.hooks.imagecb.ImageCbHook"


def _imagecb_plugin(deployment: Deployment, **env: str) -> list[dict]:
    """The ``imagecb`` entries ``airflow plugins -o json`` lists (it prints no JSON when empty)."""
    output = _run(
        [deployment.airflow, "plugins", "-o", "json"], {**deployment.env, **env}, deployment.home
    ).stdout
    plugins = _json_list(output) if "[" in output else []
    print(f"plugins ({env or 'defaults'}): {[(p.get('name'), p.get('fastapi_apps')) for p in plugins]}")
    ours = [p for p in plugins if p.get("name") == "imagecb"]
    assert len(ours) == 1, f"plugin imagecb not discovered; airflow plugins printed:\n{output[-2000:]}"
    return ours


def _assert_fastapi_app(plugin: dict) -> None:
    apps = plugin.get("fastapi_apps") or []
    assert [(a.get("name"), a.get("url_prefix")) for a in apps] == [("imagecb", "/imagecb")], plugin


def test_the_plugin_is_declared_in_the_provider_info(deployment: Deployment):
    # Airflow imports provider-declared plugins only when providers are discovered eagerly.
    (plugin,) = _imagecb_plugin(deployment, AIRFLOW__CORE__LAZY_DISCOVER_PROVIDERS="False")
    _assert_fastapi_app(plugin)


def test_the_plugin_is_discovered_without_a_plugins_folder(deployment: Deployment):
    """With Airflow's defaults the plugin comes from the wheel's ``airflow.plugins`` entry point."""
    (plugin,) = _imagecb_plugin(deployment)
    _assert_fastapi_app(plugin)


def test_the_task_decorator_is_registered(deployment: Deployment):
    proc = _run(
        [deployment.python, "-c", "from airflow.sdk import task; print(task.imagecb)"],
        deployment.env,
        deployment.home,
    )
    print(proc.stdout.strip())
    assert "imagecb_task" in proc.stdout, proc.stdout + proc.stderr


@pytest.fixture
def simulator(deployment: Deployment, tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "simulator.log").open("w")
    proc = subprocess.Popen(
        [
            deployment.python,
            "-m",
            "imagecb_provider.testing.simulator",
            "--port",
            str(port),
            "--latency",
            "1",
        ],
        env=deployment.env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "simulator.log").read_text()
            try:
                with opener.open(f"{url}/_sim/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the simulator did not answer /_sim/health within 60 s"
            time.sleep(0.3)
        print(f"simulator up at {url}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()


def test_the_quickstart_dag_runs_against_the_simulator(
    deployment: Deployment, simulator: str, tmp_path: Path
):
    archive = tmp_path / "archive"
    env = {
        **deployment.env,
        "AIRFLOW_CONN_IMAGECB_DEFAULT": json.dumps(
            {"conn_type": "imagecb", "host": simulator, "password": "test-key"}
        ),
    }
    conf = {"archive_root": str(archive), "poll_interval": 1}
    proc = _run(
        [deployment.airflow, "dags", "test", DAG_ID, "-c", json.dumps(conf)],
        env,
        deployment.home,
        timeout=600,
        check=False,
    )
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
    print(tail)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"

    with sqlite3.connect(deployment.db) as db:
        runs = db.execute("SELECT run_id, state FROM dag_run WHERE dag_id = ?", (DAG_ID,)).fetchall()
        tasks = dict(
            db.execute("SELECT task_id, state FROM task_instance WHERE dag_id = ?", (DAG_ID,)).fetchall()
        )
    print(f"dag runs: {runs}; tasks: {tasks}")
    assert [state for _, state in runs] == ["success"], runs
    assert tasks == dict.fromkeys(("hero", "keep", "submit", "wait"), "success"), tasks

    images = sorted(p for p in archive.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    print(f"archived images: {[str(p.relative_to(archive)) for p in images]}")
    assert images, f"no image archived under {archive}: {sorted(archive.rglob('*'))}"
    assert all(p.stat().st_size > 0 for p in images)
