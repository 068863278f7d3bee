"""Fixtures shared by the integration tests: S3 through moto's server."""

from __future__ import annotations

import json
import socket

import pytest
from moto_conditional_writes import make_conditional_puts_atomic


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def moto_s3(monkeypatch):
    """moto's S3 server on loopback (bucket ``imagecb-archive``), with the ``aws_moto`` connection."""
    import boto3
    from moto.server import ThreadedMotoServer

    make_conditional_puts_atomic(monkeypatch)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # moto keeps its buckets in process-wide memory: start from an empty S3 whatever ran before
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10)
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_MOTO",
        json.dumps(
            {
                "conn_type": "aws",
                "login": "testing",
                "password": "testing",
                "extra": {"endpoint_url": endpoint, "region_name": "us-east-1"},
            }
        ),
    )
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket="imagecb-archive")
    _forget_filesystems()
    yield client
    server.stop()
    _forget_filesystems()


def _forget_filesystems() -> None:
    """Each test's moto server has its own port: drop filesystems cached for an earlier one."""
    import s3fs
    from airflow.sdk.io import store

    store._STORE_CACHE.clear()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def batch_operator():
    """
    Build an ``ImageBatchGenerateOperator`` over prompts, waiting in the worker, with quick retries.

    Call it with the prompts and any other operator argument; results come back in ``"return"`` mode.
    """
    from imagecb_provider.hooks.protocol import RetryPolicy
    from imagecb_provider.operators.generate import ImageBatchGenerateOperator

    def build(prompts: list[str], **kwargs) -> ImageBatchGenerateOperator:
        op = ImageBatchGenerateOperator(
            task_id="b",
            requests=[{"prompt": p} for p in prompts],
            deferrable=False,
            poll_interval=0.1,
            failure_mode="return",
            **kwargs,
        )
        op.hook.retry_policy = RetryPolicy(max_attempts=6, initial_delay=0.01, max_delay=0.02, jitter=0)
        return op

    return build
