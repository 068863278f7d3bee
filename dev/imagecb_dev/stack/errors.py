"""Errors raised by the real-stack harness."""

from __future__ import annotations


class StackError(RuntimeError):
    """The stack could not start, or a component misbehaved; the message carries the log tails."""


class StackUnavailable(StackError):
    """
    Raise when a service the stack needs (PostgreSQL, Redis) does not answer.

    :param service: the service's name, e.g. ``PostgreSQL``
    :param address: where it was looked for, ``host:port``
    :param how_to_start: the command that starts it on this machine
    :param detail: what the client library said
    """

    def __init__(self, service: str, address: str, how_to_start: str, detail: str = "") -> None:
        self.service = service
        self.address = address
        self.how_to_start = how_to_start
        reason = f": {detail.strip()}" if detail.strip() else ""
        super().__init__(
            f"{service} does not answer on {address}{reason}\n"
            f"The real Airflow stack needs it. Start it with:\n    {how_to_start}"
        )


class RunTimeout(StackError):
    """A DAG run did not finish in time; the message holds its timeline and task states."""


class StackAPIError(StackError):
    """
    Raise when the Airflow REST API answers with an error status.

    :param method: the HTTP method
    :param url: the full URL called
    :param status_code: the HTTP status
    :param body: the response text (the API's ``detail``)
    """

    def __init__(self, method: str, url: str, status_code: int, body: str) -> None:
        self.method = method
        self.url = url
        self.status_code = status_code
        self.body = body
        super().__init__(f"{method} {url} -> {status_code}: {body[:2000]}")
