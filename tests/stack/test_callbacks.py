"""
Callback mode on the real stack: the simulator posts signed callbacks to the API server's
``/imagecb`` route; the batch DAG's waits are woken by them, not by polling.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from imagecb_provider.testing.simulator import run_in_subprocess

pytestmark = [pytest.mark.stack, pytest.mark.timeout(900)]

DAG_ID = "imagecb_batch_generate"
HMAC_KEY = "whk-stack-callbacks"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_batch_in_callback_mode_is_woken_by_signed_callbacks(airflow_stack, tmp_path: Path):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\n" + "".join(f'"a callback image {i}"\n' for i in range(24)))
    port = _free_port()
    with run_in_subprocess(latency=3.0, webhook_hmac_key=HMAC_KEY, credits=1e9) as sim:
        conn = {
            **json.loads(sim.connection_json()),
            "extra": {"callback_base_url": f"http://127.0.0.1:{port}", "webhook_hmac_key": HMAC_KEY},
        }
        stack = airflow_stack(
            private=True, api_port=port, connections={"imagecb_default": conn}, dag_ids=[DAG_ID]
        )
        conf = {
            "prompts_path": str(prompts),
            "archive_root": str(tmp_path / "archive"),
            "wait_mode": "callback",
            "poll_interval": 300,  # the safety net only: callbacks must do the work
            "chunk_size": 8,
        }
        started = time.monotonic()
        run_id = stack.trigger(DAG_ID, conf=conf)
        assert stack.wait_for_run(DAG_ID, run_id, timeout=600) == "success"
        print(f"24 images in callback mode: {time.monotonic() - started:.1f} s")
        stats = sim.stats()

    # every callback reached the receiver and was answered 2xx
    assert stats["callbacks"]
    assert all(200 <= (c["status"] or 0) < 300 for c in stats["callbacks"])
    # each prompt submitted once; woken by callbacks, not by polling (at most 1 status call each)
    assert stats["submissions_total"] == 24
    assert set(stats["submissions"].values()) == {1}
    assert stats["status_calls_total"] <= 24
    results = [
        result
        for index in range(3)
        for result in stack.client.xcom(DAG_ID, run_id, "image.generate", map_index=index)
    ]
    assert len(results) == 24
    assert {r["via"] for r in results} == {"callback"}
    assert {r["outcome"] for r in results} == {"success"}
    # every image archived once
    manifest = next((tmp_path / "archive").glob("*/images/manifest.jsonl")).read_text().splitlines()
    lines = [json.loads(line) for line in manifest]
    assert len(lines) == 48
    assert len({(line["remote_task_id"], line["source"]) for line in lines}) == 48

    # no key and no callback token anywhere Airflow keeps task data, nor in any task log
    tokens = {c["url"].rsplit("/", 1)[1] for c in stats["callbacks"]}
    secrets = {sim.config.api_key, HMAC_KEY} | tokens | {t.split(".")[1] for t in tokens}
    assert _stored_text_holding(stack, secrets) == []
    logs = [p for p in stack.task_log_folder.rglob("*") if p.is_file()]
    assert logs
    assert [p.name for p in logs if any(secret in p.read_text(errors="ignore") for secret in secrets)] == []


def _stored_text_holding(stack, secrets: set[str]) -> list[str]:
    """The (table, column) of the stack's database whose text holds one of ``secrets``."""
    import psycopg2

    columns = {
        "xcom": "value",
        "task_state_store": "value",
        "trigger": "kwargs",
        "task_instance": "next_kwargs",
        "rendered_task_instance_fields": "rendered_fields",
        "dag_run": "conf",
    }
    found = []
    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=stack.database)
    try:
        with conn.cursor() as cursor:
            for table, column in columns.items():
                cursor.execute(f"SELECT {column}::text FROM {table}")
                texts = [row[0] or "" for row in cursor.fetchall()]
                if any(secret in text for secret in secrets for text in texts):
                    found.append(f"{table}.{column}")
    finally:
        conn.close()
    return found
