"""
Callback mode checks its ``callback_base_url`` before anything is submitted: the receiver's health
route must answer, served on loopback the way the API server mounts the plugin. A URL that leads
elsewhere fails the task at once, naming the URL and what came back, with no credit spent; a base
URL that already ends in the receiver's prefix (``/imagecb``...) is taken without it.
"""

from __future__ import annotations

import itertools
import logging
import socket
import time
from datetime import datetime, timedelta

import pytest
from airflow.sdk.exceptions import AirflowFailException
from cbhelpers import ServerThread, wait_until

from imagecb_provider.callbacks.client import (
    check_receiver,
    forget_receiver_checks,
)
from imagecb_provider.callbacks.tokens import receiver_url
from imagecb_provider.exceptions import ImageCbConfigurationError, ImageCbReceiverUnreachable

pytestmark = pytest.mark.timeout(120)

HEALTH = "/imagecb/callbacks/health"
_ids = itertools.count()


@pytest.fixture(autouse=True)
def _no_kept_checks():
    forget_receiver_checks()
    yield
    forget_receiver_checks()


def _health_requests(receiver, count: int) -> list[str]:
    """The health checks the receiver saw, once ``count`` arrived (it logs each after answering)."""

    def seen() -> list[str]:
        return [path for method, path, _ in receiver.requests if method == "GET" and path.endswith("/health")]

    wait_until(lambda: len(seen()) >= count, timeout=10, what=f"{count} health check(s)")
    time.sleep(0.2)  # and no more
    return seen()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def impostor():
    """A server answering every path one way: ``impostor(status, body, content_type, headers)``."""
    started: list[ServerThread] = []

    def serve(status: int, body: str, content_type: str = "text/html", headers: dict | None = None) -> str:
        from starlette.responses import Response

        async def app(scope, receive, send):
            response = Response(body, status_code=status, media_type=content_type, headers=headers)
            await response(scope, receive, send)

        server = ServerThread(app).start()
        started.append(server)
        return server.url

    yield serve
    for server in started:
        server.stop()


# ------------------------------------------------------------------------------ the check
def test_the_api_servers_url_passes_and_is_checked_once_per_process(receiver, imagecb_simulator, connect):
    settings = connect(imagecb_simulator, receiver.url)
    assert check_receiver(settings) == f"{receiver.url}/imagecb/callbacks"
    assert check_receiver(settings) == f"{receiver.url}/imagecb/callbacks"
    assert _health_requests(receiver, 1) == [HEALTH]
    forget_receiver_checks()
    check_receiver(settings, ttl=0)
    check_receiver(settings)
    assert _health_requests(receiver, 3) == [HEALTH] * 3  # a good answer kept 0 s is not kept


@pytest.mark.parametrize("suffix", ["/imagecb", "/imagecb/", "/imagecb/callbacks", "/imagecb/callbacks/"])
def test_a_base_url_that_ends_in_the_receivers_prefix_is_taken_without_it(
    receiver, imagecb_simulator, connect, caplog, suffix
):
    settings = connect(imagecb_simulator, receiver.url + suffix)
    with caplog.at_level(logging.INFO, logger="imagecb_provider.callbacks.tokens"):
        assert check_receiver(settings) == f"{receiver.url}/imagecb/callbacks"
        assert receiver_url(settings) == f"{receiver.url}/imagecb/callbacks"
    assert _health_requests(receiver, 1) == [HEALTH]
    notes = [r.getMessage() for r in caplog.records if "callback_base_url" in r.getMessage()]
    assert len(notes) == 1, notes  # logged once per process and URL
    assert f"using {receiver.url}, so callbacks go to {receiver.url}/imagecb/callbacks/" in notes[0]


def test_a_base_url_with_the_prefix_only_inside_it_is_kept(imagecb_simulator, connect):
    settings = connect(imagecb_simulator, "https://airflow.example.com/imagecb-prod")
    assert receiver_url(settings) == "https://airflow.example.com/imagecb-prod/imagecb/callbacks"


def test_a_url_that_leads_elsewhere_fails_naming_it_and_the_answer(receiver, imagecb_simulator, connect):
    settings = connect(imagecb_simulator, f"{receiver.url}/airflow")
    for _ in range(2):  # a bad answer is not kept: each task asks again
        with pytest.raises(ImageCbConfigurationError) as caught:
            check_receiver(settings)
        assert isinstance(caught.value, AirflowFailException)  # no retry: the same answer would come
        message = str(caught.value)
        assert f"GET {receiver.url}/airflow{HEALTH} answered 404 (Not Found)" in message
        assert "callback_base_url of connection 'imagecb_default'" in message
        assert "nothing was submitted" in message
    assert _health_requests(receiver, 2) == [f"/airflow{HEALTH}"] * 2


@pytest.mark.parametrize(
    ("status", "body", "content_type", "headers", "expected"),
    [
        (200, "<html>Airflow</html>", "text/html", None, "answered 200 but not the receiver's health JSON"),
        (200, '{"status": "healthy"}', "application/json", None, "not the receiver's health JSON"),
        (
            307,
            "",
            "text/plain",
            {"Location": "https://airflow.example.com/imagecb/callbacks/health"},
            "answered 307, a redirect to https://airflow.example.com/imagecb/callbacks/health",
        ),
        (
            401,
            '{"detail": "Not authenticated"}',
            "application/json",
            None,
            "answered 401 (Not authenticated)",
        ),
    ],
    ids=["html-page", "other-json", "redirect", "401"],
)
def test_answers_that_are_not_the_receivers_fail_at_once(
    impostor, imagecb_simulator, connect, status, body, content_type, headers, expected
):
    url = impostor(status, body, content_type, headers)
    settings = connect(imagecb_simulator, url)
    with pytest.raises(ImageCbConfigurationError, match="callback_base_url") as caught:
        check_receiver(settings)
    assert f"GET {url}{HEALTH}" in str(caught.value)
    assert expected in str(caught.value)


def test_a_receiver_that_does_not_answer_or_fails_is_retried(impostor, imagecb_simulator, connect):
    nobody = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(ImageCbReceiverUnreachable) as caught:
        check_receiver(connect(imagecb_simulator, nobody))
    assert not isinstance(caught.value, AirflowFailException)  # the API server may be restarting
    assert f"GET {nobody}{HEALTH} got no answer (ConnectionError)" in str(caught.value)

    failing = impostor(503, '{"detail": "the callback store is unavailable"}', "application/json")
    with pytest.raises(ImageCbReceiverUnreachable) as caught:
        check_receiver(connect(imagecb_simulator, failing))
    assert "answered 503 (the callback store is unavailable)" in str(caught.value)
    assert "airflow db migrate" in str(caught.value)


def test_a_url_that_is_no_url_fails_at_once(imagecb_simulator, connect):
    with pytest.raises(ImageCbConfigurationError, match="is not a usable URL"):
        check_receiver(connect(imagecb_simulator, "airflow.example.com"))


# --------------------------------------------------------------------- in a real task
def _dag(name: str):
    from airflow.sdk import DAG

    return DAG(
        f"{name}_{next(_ids)}",
        schedule=None,
        start_date=datetime(2026, 1, 1),
        default_args={"retry_delay": timedelta(seconds=0)},
    )


@pytest.mark.airflow
def test_a_task_with_a_wrong_callback_url_fails_before_submitting(
    receiver, imagecb_simulator, connect, run_dag
):
    from imagecb_provider.operators.generate import ImageBatchGenerateOperator, ImageGenerateOperator

    connect(imagecb_simulator, f"{receiver.url}/airflow")
    with _dag("cb_wrong_url") as dag:
        ImageGenerateOperator(task_id="one", prompt="a heron", wait_mode="callback", retries=2)
        ImageBatchGenerateOperator(
            task_id="many", requests=[{"prompt": "a crane"}], wait_mode="callback", retries=2
        )
    dag_run = run_dag(dag)
    tis = {ti.task_id: ti for ti in dag_run.get_task_instances()}
    assert {(ti.state, ti.try_number) for ti in tis.values()} == {("failed", 1)}  # at once, no retry
    assert imagecb_simulator.stats()["submissions_total"] == 0
    assert _health_requests(receiver, 2) == [f"/airflow{HEALTH}"] * 2


@pytest.mark.airflow
def test_a_task_given_the_url_with_imagecb_is_woken_by_its_callback(
    receiver, imagecb_simulator, connect, run_dag
):
    from imagecb_provider.operators.generate import ImageGenerateOperator

    connect(imagecb_simulator, f"{receiver.url}/imagecb")
    with _dag("cb_suffix_url") as dag:
        # Polls only after 60 s and gives up after 30 s: only the callback can end it in time.
        ImageGenerateOperator(
            task_id="one", prompt="a swan", wait_mode="callback", poll_interval=60, timeout=30
        )
    dag_run = run_dag(dag)
    ti = dag_run.get_task_instances()[0]
    assert (dag_run.state, ti.state) == ("success", "success")
    result = ti.xcom_pull(task_ids="one")
    assert (result["outcome"], result["via"]) == ("success", "callback")
    stats = imagecb_simulator.stats()
    assert stats["submissions_total"] == 1
    callbacks = stats["callbacks"]
    assert callbacks
    assert {c["status"] for c in callbacks} == {200}
    assert all(c["url"].startswith(f"{receiver.url}/imagecb/callbacks/") for c in callbacks)
