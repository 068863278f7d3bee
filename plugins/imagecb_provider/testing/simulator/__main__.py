"""
``python -m imagecb_provider.testing.simulator``: the simulator as a standalone server.

Options not offered as flags can be given as JSON in ``IMAGECB_SIM_CONFIG`` (flags win), and
the webhook key in ``IMAGECB_SIM_WEBHOOK_HMAC_KEY`` so it stays off the command line. The one
line printed at start says where it listens; keys are never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import uvicorn

from imagecb_provider.testing.simulator.app import create_app
from imagecb_provider.testing.simulator.config import (
    FAULT_ENDPOINTS,
    FAULT_KINDS,
    TIMESTAMP_FORMATS,
    UNKNOWN_RECORD_FORMS,
    SimulatorConfig,
)
from imagecb_provider.testing.simulator.server import CONFIG_ENV, SimulatorServer, base_url, bind_socket

HMAC_KEY_ENV = "IMAGECB_SIM_WEBHOOK_HMAC_KEY"
API_KEY_ENV = "IMAGECB_SIM_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m imagecb_provider.testing.simulator",
        description="Serve a simulator of the kie.ai Flux Kontext image API (see docs/connections.md).",
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    add("--port", type=int, default=8089, help="port to listen on; 0 picks a free one (default 8089)")
    add("--api-key", help=f"the API key clients must send (default test-key; or env {API_KEY_ENV})")
    add("--latency", type=float, help="seconds from submission to completion (default 5)")
    add("--time-factor", type=float, help="multiplies every delay: latency, callback retries (default 1)")
    add("--rate-limit", metavar="COUNT/SECONDS", help="submissions allowed per window (default 20/10)")
    add("--credits", type=float, help="starting credit balance (default 1000)")
    add("--http-status-errors", action="store_true", default=None, help="errors as real HTTP statuses")
    add("--timestamp-format", choices=TIMESTAMP_FORMATS, help="createTime/completeTime form (default iso)")
    add(
        "--unknown-record",
        choices=UNKNOWN_RECORD_FORMS,
        help="record-info for an unknown task: 200 + code 422 (default), code 404, or data null",
    )
    add("--null-strings", action="store_true", default=None, help='write "null" in empty record fields')
    add("--origin-ttl", type=float, help="seconds an origin image URL lives after completion (default 600)")
    add("--download-url-ttl", type=float, help="seconds a fresh download URL lives (default 1200)")
    add("--fault-rate", type=float, help="share of --fault-endpoints calls failing at random (default 0)")
    add("--fault-kinds", help=f"comma-separated subset of {','.join(FAULT_KINDS)} (default 500,455,drop)")
    endpoints = ",".join(FAULT_ENDPOINTS)
    add("--fault-endpoints", help=f"comma-separated subset of {endpoints} (default record-info)")
    add("--submit-answer-delay", type=float, help="seconds a submission's answer is held back (default 0)")
    add("--random-failure-rate", type=float, help="share of unmarked tasks that fail (default 0)")
    add("--seed", type=int, help="seed of the random choices (default 0)")
    add("--disabled-models", help="comma-separated models answered with 505")
    add("--duplicate-callbacks", action="store_true", default=None, help="send every callback twice")
    add("--webhook-hmac-key", help=f"sign callbacks with this key (prefer env {HMAC_KEY_ENV})")
    add("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add("--access-log", action="store_true", help="log every request")
    return parser


def _rate_limit(value: str) -> dict[str, Any]:
    count, _, window = value.partition("/")
    try:
        return {"rate_limit_count": int(count), "rate_limit_window": float(window or 10)}
    except ValueError:
        raise SystemExit(f"--rate-limit must look like 20/10 (count/seconds), got {value!r}") from None


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def config_from(args: argparse.Namespace, environ: Mapping[str, str]) -> SimulatorConfig:
    """``IMAGECB_SIM_CONFIG`` first, then key env vars, then flags given on the command line."""
    fields: dict[str, Any] = json.loads(environ.get(CONFIG_ENV) or "{}")
    for name, env in (("api_key", API_KEY_ENV), ("webhook_hmac_key", HMAC_KEY_ENV)):
        if environ.get(env):
            fields[name] = environ[env]
    simple = (
        "api_key latency time_factor credits http_status_errors timestamp_format unknown_record null_strings "
        "origin_ttl "
        "download_url_ttl fault_rate random_failure_rate seed duplicate_callbacks webhook_hmac_key "
        "submit_answer_delay"
    )
    fields |= {name: getattr(args, name) for name in simple.split() if getattr(args, name) is not None}
    if args.rate_limit:
        fields |= _rate_limit(args.rate_limit)
    if args.fault_kinds is not None:
        fields["fault_kinds"] = _csv(args.fault_kinds)
    if args.fault_endpoints is not None:
        fields["fault_endpoints"] = _csv(args.fault_endpoints)
    if args.disabled_models is not None:
        fields["disabled_models"] = _csv(args.disabled_models)
    try:
        return SimulatorConfig(**fields)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"bad simulator option: {error}") from None


def _banner(url: str, config: SimulatorConfig) -> str:
    signed = "signed" if config.webhook_hmac_key else "unsigned"
    return (
        f"imagecb simulator listening on {url} (latency {config.latency:g}s x{config.time_factor:g}, "
        f"rate limit {config.rate_limit_count}/{config.rate_limit_window:g}s, "
        f"{'http-status' if config.http_status_errors else 'body-code'} errors, {signed} callbacks)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from(args, os.environ)
    sock = bind_socket(args.host, args.port)
    print(_banner(base_url(args.host, sock.getsockname()[1]), config), flush=True)
    server = SimulatorServer(
        uvicorn.Config(create_app(config), log_level=args.log_level, access_log=args.access_log)
    )
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
