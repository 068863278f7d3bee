"""
``python -m benchmarks.callbacks_load``: the callback receiver's throughput under a loopback load.

The receiver runs as the standalone process (``python -m imagecb_provider.callbacks``) on a fresh
metadata database (SQLite in a temporary AIRFLOW_HOME by default; ``--postgres`` creates and drops
a database on the local PostgreSQL). This process sends signed callbacks the way the vendor does,
from ``--clients`` concurrent httpx clients, for task instance URLs (each checked against its
ledger through the state store) and for asset URLs, with a share of duplicate deliveries. Then it
checks that every callback was recorded exactly once and prints the figures as JSON lines. The
figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

API_KEY = "bench-key"
WEBHOOK_KEY = "bench-webhook-key"
PG_SERVER = "postgresql+psycopg2://postgres@127.0.0.1:5432"


def _env(sql_alchemy_conn: str, home: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        AIRFLOW_HOME=home,
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=sql_alchemy_conn,
        AIRFLOW__DATABASE__EXTERNAL_DB_MANAGERS="imagecb_provider.callbacks.db.CallbackDBManager",
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__LOGGING__LOGGING_LEVEL="WARNING",
        AIRFLOW_CONN_IMAGECB_DEFAULT=json.dumps(
            {"conn_type": "imagecb", "password": API_KEY, "extra": {"webhook_hmac_key": WEBHOOK_KEY}}
        ),
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "plugins"), env.get("PYTHONPATH")) if p),
    )
    return env


@contextmanager
def _database(postgres: bool):
    """Yield a migrated metadata database URL (``airflow db migrate`` with the provider's db-manager)."""
    home = tempfile.mkdtemp(prefix="imagecb-bench-callbacks-")
    if not postgres:
        url = f"sqlite:///{home}/airflow.db"
        _migrate(url, home)
        yield url, home
        return
    import sqlalchemy as sa

    admin = sa.create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    name = f"imagecb_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        url = f"{PG_SERVER}/{name}"
        _migrate(url, home)
        yield url, home
    finally:
        with admin.connect() as conn:
            conn.execute(
                sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name},
            )
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))


def _migrate(url: str, home: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        env=_env(url, home),
        check=True,
        capture_output=True,
        timeout=300,
    )


@contextmanager
def _receiver(url: str, home: str):
    """Run the standalone receiver on a free port; yield its base URL."""
    command = [sys.executable, "-m", "imagecb_provider.callbacks", "--port", "0", "--log-level", "warning"]
    child = subprocess.Popen(command, env=_env(url, home), stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline() if child.stdout else ""
        base = line.split(" on ", 1)[1].strip().removesuffix("/imagecb/callbacks")
        yield base
    finally:
        child.terminate()
        child.wait(timeout=15)


def _settings(base: str):
    from imagecb_provider.hooks.imagecb import ImageCbConnectionSettings

    return ImageCbConnectionSettings(
        conn_id="imagecb_default", base_url="http://vendor", api_key=API_KEY, callback_base_url=base
    )


def _deliveries(base: str, count: int, duplicates: float, kind: str) -> list[tuple[str, str]]:
    """Make (callback URL, remote task id) pairs; a share of them is sent twice, as the vendor may."""
    from imagecb_provider.callbacks.tokens import asset_callback_url, callback_url

    settings = _settings(base)
    run = uuid.uuid4().hex[:8]
    pairs = []
    for i in range(count):
        if kind == "ti":
            url = callback_url(settings, dag_id="bench", run_id=f"bench_{run}", task_id="generate", slot=i)
        else:
            url = asset_callback_url(settings, "bench")
        pairs.append((url, f"{kind}-{run}-{i:06d}"))
    pairs += pairs[: int(count * duplicates)]
    return pairs


async def _send_all(pairs: list[tuple[str, str]], clients: int) -> tuple[float, list[float], dict[int, int]]:
    import httpx

    from imagecb_provider.callbacks.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, webhook_signature

    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    for pair in pairs:
        queue.put_nowait(pair)
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def client() -> None:
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            while not queue.empty():
                url, remote_task_id = queue.get_nowait()
                stamp = str(int(time.time()))
                body = {"code": 200, "msg": "success", "data": {"taskId": remote_task_id, "info": {}}}
                headers = {
                    "Content-Type": "application/json",
                    TIMESTAMP_HEADER: stamp,
                    SIGNATURE_HEADER: webhook_signature(WEBHOOK_KEY, remote_task_id, stamp),
                }
                started = time.perf_counter()
                answer = await http.post(url, content=json.dumps(body), headers=headers)
                latencies.append(time.perf_counter() - started)
                statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - started, latencies, statuses


def _recorded(url: str, ids: set[str]) -> dict[str, int]:
    import sqlalchemy as sa

    from imagecb_provider.callbacks.schema import callback_table

    engine = sa.create_engine(url, poolclass=sa.NullPool)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(callback_table.c.remote_task_id)).scalars().all()
    engine.dispose()
    mine = [r for r in rows if r in ids]
    return {"rows": len(mine), "unique": len(set(mine))}


def bench(kind: str, *, count: int, clients: int, duplicates: float, postgres: bool) -> dict:
    """Send ``count`` callbacks (plus duplicates) of one kind and check each was recorded once."""
    with _database(postgres) as (url, home), _receiver(url, home) as base:
        pairs = _deliveries(base, count, duplicates, kind)
        asyncio.run(_send_all(pairs[: min(50, count)], clients))  # warm up: imports, connection cache
        pairs = _deliveries(base, count, duplicates, kind)
        elapsed, latencies, statuses = asyncio.run(_send_all(pairs, clients))
        recorded = _recorded(url, {remote_task_id for _, remote_task_id in pairs})
    latencies.sort()
    return {
        "database": "postgresql" if postgres else "sqlite",
        "kind": kind,
        "clients": clients,
        "requests": len(pairs),
        "distinct_callbacks": count,
        "requests_per_s": round(len(pairs) / elapsed, 1),
        "latency_ms_p50": round(statistics.median(latencies) * 1000, 2),
        "latency_ms_p95": round(latencies[int(len(latencies) * 0.95)] * 1000, 2),
        "statuses": statuses,
        "recorded_rows": recorded["rows"],
        "lost": count - recorded["unique"],
        "doubled": recorded["rows"] - recorded["unique"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=3000, help="distinct callbacks per run (3000)")
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients (20)")
    parser.add_argument("--duplicates", type=float, default=0.1, help="share sent twice (0.1)")
    parser.add_argument("--postgres", action="store_true", help="also run on the local PostgreSQL")
    args = parser.parse_args()
    databases = [False, True] if args.postgres else [False]
    for postgres in databases:
        for kind in ("ti", "asset"):
            figures = bench(
                kind, count=args.count, clients=args.clients, duplicates=args.duplicates, postgres=postgres
            )
            print(json.dumps({"callbacks_load": figures}), flush=True)


if __name__ == "__main__":
    main()
