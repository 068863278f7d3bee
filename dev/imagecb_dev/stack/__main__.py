"""
``python -m imagecb_dev.stack``: start a real Airflow stack from a shell, or clean up.

``up`` starts one (separate API server, scheduler, DAG processor, triggerer; a Celery worker
with ``--executor CeleryExecutor``), prints its URL, user and password, and runs until Ctrl-C
or SIGTERM, then stops everything and drops its database. ``cleanup`` removes what stacks of
ended processes left behind.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType

from imagecb_dev.stack.cleanup import sweep
from imagecb_dev.stack.core import EXECUTORS, AirflowStack
from imagecb_dev.stack.errors import StackError, StackUnavailable
from imagecb_dev.stack.services import Postgres, Redis
from imagecb_dev.stack.template import drop_templates


def _pairs(values: Sequence[str], flag: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} takes KEY=VALUE, got {value!r}")
        pairs[key] = rest
    return pairs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m imagecb_dev.stack",
        description="Run a real Airflow stack on the local PostgreSQL (see dev/README.md).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start a stack and keep it running until Ctrl-C")
    add = up.add_argument
    add("--port", type=int, help="the API server's port (default: a free one)")
    add("--executor", choices=EXECUTORS, default="LocalExecutor")
    add("--parallelism", type=int, default=16)
    add("--dags-folder", help="default: the repository's dags/")
    add("--plugins-folder", help="default: the repository's plugins/")
    add("--work-dir", help="AIRFLOW_HOME and logs (default: a temp dir, removed on stop)")
    add("--keep", action="store_true", help="keep the database and the work dir on stop")
    add("--conn", action="append", default=[], metavar="ID=JSON|URI", help="a connection (repeatable)")
    add("--var", action="append", default=[], metavar="KEY=VALUE", help="a variable (repeatable)")
    add("--pool", action="append", default=[], metavar="NAME=SLOTS", help="a pool (repeatable)")
    add("--env", action="append", default=[], metavar="NAME=VALUE", help="an extra variable (repeatable)")
    add("--dag", action="append", default=[], metavar="DAG_ID", help="wait for and unpause a DAG")
    add("--schedule", action="store_true", help="let the scheduler run DAGs on their schedules")
    add("--username", default="admin")
    add("--password", help="default: a random one")
    add("--json", action="store_true", help="print the stack's description as one JSON line")
    clean = commands.add_parser("cleanup", help="remove leftovers of stacks whose process ended")
    clean.add_argument("--kept", action="store_true", help="also databases kept with --keep")
    clean.add_argument("--templates", action="store_true", help="also the migrated template databases")
    return parser


def stack_from(args: argparse.Namespace) -> AirflowStack:
    """
    Build the stack the ``up`` arguments describe.

    :param args: the parsed arguments
    """
    pools = {name: int(slots) for name, slots in _pairs(args.pool, "--pool").items()}
    return AirflowStack(
        executor=args.executor,
        parallelism=args.parallelism,
        dags_folder=args.dags_folder,
        plugins_folder=args.plugins_folder,
        env=_pairs(args.env, "--env"),
        connections=_pairs(args.conn, "--conn"),
        pools={"imagecb_submissions": 1} | pools,
        variables=_pairs(args.var, "--var"),
        api_port=args.port,
        work_dir=args.work_dir,
        keep=args.keep,
        dag_ids=args.dag,
        use_job_schedule=args.schedule,
        username=args.username,
        password=args.password,
    )


def _banner(stack: AirflowStack) -> str:
    info = stack.describe()
    return "\n".join(
        [
            f"== Airflow {stack.executor} stack ready in {stack.timings['total']:.1f}s",
            f"   UI and API: {info['url']}   user: {info['username']}   password: {info['password']}",
            f"   database:   {info['database']}    work dir: {info['work_dir']}",
            f"   airflow CLI against it:  source {info['env_file']}",
            "   Ctrl-C stops it" + ("" if stack.keep else " and drops the database"),
        ]
    )


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def up(args: argparse.Namespace) -> int:
    """Start a stack, print how to reach it, wait for Ctrl-C, stop it."""
    # SIGINT too: a process started in the background by a non-interactive shell (CI) inherits
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler of its own.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupt)
    stack = stack_from(args)
    try:
        stack.start()
        print(json.dumps(stack.describe()) if args.json else _banner(stack), flush=True)
        _watch(stack)
    except StackUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except StackError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n== stopping", flush=True)
    finally:
        stack.stop()
    return 0


def _watch(stack: AirflowStack) -> None:
    """Block until interrupted; say once when a component goes down."""
    reported: set[str] = set()
    while True:
        time.sleep(2.0)
        for name in stack.component_names:
            if stack.alive(name):
                reported.discard(name)
            elif name not in reported:
                reported.add(name)
                print(f"!! {name} is down:\n{stack.logs(name, 20)}", file=sys.stderr, flush=True)


def cleanup(args: argparse.Namespace) -> int:
    """Remove leftovers of ended stacks; print what went."""
    postgres = Postgres()
    redis: Redis | None = Redis()
    try:
        redis.check()
    except StackUnavailable as error:
        print(f"skipping Redis: {error.service} does not answer on {error.address}")
        redis = None
    report = sweep(postgres, redis)
    dropped = report.databases + (postgres.drop_stale_databases(kept=True) if args.kept else [])
    templates = drop_templates(postgres) if args.templates else []
    print(f"processes killed: {report.processes or 'none'}")
    print(f"databases dropped: {dropped or 'none'}")
    print(f"redis indexes freed: {report.redis_indexes or 'none'}")
    if args.templates:
        print(f"templates dropped: {templates or 'none'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return up(args) if args.command == "up" else cleanup(args)


if __name__ == "__main__":
    sys.exit(main())
