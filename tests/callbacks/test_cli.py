"""``python -m imagecb_provider.callbacks url``: a callback URL for a submission made outside Airflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from imagecb_provider.callbacks.tokens import PURPOSE_ASSET, CallbackToken

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, conn: dict | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "plugins"), env.get("PYTHONPATH")) if p)
    if conn is not None:
        env["AIRFLOW_CONN_IMAGECB_DEFAULT"] = json.dumps(conn)
    command = [sys.executable, "-m", "imagecb_provider.callbacks", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def test_url_prints_an_asset_callback_url_for_the_label():
    conn = {
        "conn_type": "imagecb",
        "password": "cli-key",
        "extra": {"callback_base_url": "https://airflow.example.com/"},
    }
    completed = _run("url", "--label", "studio", "--expires-in-days", "2", conn=conn)
    assert completed.returncode == 0, completed.stderr
    url = completed.stdout.strip()
    assert url.startswith("https://airflow.example.com/imagecb/callbacks/")
    # signed with the configured keys (conftest.py), which the command inherited, not the API key
    claims = CallbackToken.verify(url.rsplit("/", 1)[1])
    assert (claims.purpose, claims.label, claims.conn_id) == (PURPOSE_ASSET, "studio", "imagecb_default")
    assert "cli-key" not in completed.stdout + completed.stderr


def test_url_without_a_callback_base_url_says_what_to_set():
    completed = _run("url", "--label", "studio", conn={"conn_type": "imagecb", "password": "cli-key"})
    assert completed.returncode != 0
    assert "callback_base_url" in completed.stderr
    assert "cli-key" not in completed.stderr


def test_help_lists_the_server_options():
    completed = _run("--help")
    assert completed.returncode == 0
    assert "--port" in completed.stdout
