"""
The receiver on its own, and callback URLs for submissions made outside Airflow.

``python -m imagecb_provider.callbacks [--host H] [--port P]`` serves the same URLs as the plugin
on the API server (``/imagecb/callbacks/...``) with uvicorn, on Airflow's configured metadata
database; port 0 picks a free port, and the first line printed says which.

``python -m imagecb_provider.callbacks url --label X [--conn-id C] [--expires-in-days N]`` prints
a callback URL for an external submission, recorded under label ``X`` for the event trigger. It is
signed with the keys of ``[imagecb] callback_signing_keys`` (or derived from ``[core] fernet_key``):
run it with the configuration of the Airflow deployment whose API server receives the callbacks.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence

from imagecb_provider.callbacks.tokens import CALLBACKS_PATH, DEFAULT_ASSET_TTL, asset_callback_url
from imagecb_provider.exceptions import ImageCbConfigurationError
from imagecb_provider.hooks.imagecb import DEFAULT_CONN_ID


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m imagecb_provider.callbacks",
        description="Serve the imagecb callback receiver (subcommand 'url' prints a callback URL).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8090, help="port; 0 picks a free one (default 8090)")
    parser.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    return parser


def _url_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m imagecb_provider.callbacks url",
        description="Print a callback URL for a submission made outside Airflow.",
    )
    parser.add_argument("--label", required=True, help="the label the event trigger filters on")
    parser.add_argument(
        "--conn-id", default=DEFAULT_CONN_ID, help=f"the imagecb connection ({DEFAULT_CONN_ID})"
    )
    parser.add_argument(
        "--expires-in-days", type=float, default=DEFAULT_ASSET_TTL / 86400, help="validity in days (30)"
    )
    return parser


def print_url(argv: Sequence[str]) -> int:
    """Print an ``asset`` callback URL for ``--label``."""
    args = _url_parser().parse_args(argv)
    from imagecb_provider.hooks.imagecb import ImageCbHook

    try:
        settings = ImageCbHook(imagecb_conn_id=args.conn_id).settings
        url = asset_callback_url(settings, args.label, expires_in=args.expires_in_days * 86400)
    except (ImageCbConfigurationError, ValueError) as error:
        # what to set, not a traceback (the messages never carry a key)
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(url)
    return 0


def serve(argv: Sequence[str]) -> int:
    """Serve the receiver with uvicorn until interrupted."""
    args = _serve_parser().parse_args(argv)
    import uvicorn

    from imagecb_provider.callbacks.app import create_app

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.create_server((args.host, args.port), family=family)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(args.host, args.host)
    shown = f"[{host}]" if ":" in host else host
    print(
        f"imagecb callback receiver listening on http://{shown}:{sock.getsockname()[1]}{CALLBACKS_PATH}",
        flush=True,
    )
    config = uvicorn.Config(
        create_app(prefix="/imagecb"), log_level=args.log_level, timeout_graceful_shutdown=5, lifespan="off"
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to ``url`` or to the server."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "url":
        return print_url(argv[1:])
    if argv and argv[0] == "serve":
        argv = argv[1:]
    return serve(argv)


if __name__ == "__main__":
    sys.exit(main())
