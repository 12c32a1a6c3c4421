"""``hd-sdk``: serve a location's definitions, or run one of its jobs."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import traceback

from .config import ConfigError, validate_config
from .jobs import load_registry
from .progress import Context
from .server import make_server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hd-sdk", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the location's code server")
    serve.add_argument("--module", required=True, help="module that declares the jobs")
    serve.add_argument("--port", type=int, default=8080)
    show = commands.add_parser("definitions", help="print the location's definitions as JSON")
    show.add_argument("--module", required=True)
    run = commands.add_parser("run", help="run one job (what a run container does)")
    run.add_argument("--module", required=True)
    run.add_argument("--job", required=True)
    run.add_argument("--config", default="{}", help="the run's config, as JSON")
    args = parser.parse_args(argv)

    try:
        registry = load_registry(args.module)
    except (ImportError, ValueError, TypeError) as exc:
        # A module that is not one, or one whose jobs are declared wrong (@job checks them).
        print(f"error: cannot import {args.module}: {exc}", file=sys.stderr)
        return 2
    if args.command == "definitions":
        print(json.dumps({"module": args.module, "jobs": registry.definitions()}, indent=2))
        return 0
    if args.command == "serve":
        server = make_server(registry, args.module, args.port)
        print(
            f"code server for {args.module}: {len(registry.jobs)} job(s) on :{args.port}",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()
        return 0
    try:
        job_ = registry.get(args.job)
        config = json.loads(args.config, parse_constant=_no_constant)
        validate_config(job_.config_schema, config)
    except (KeyError, ValueError, ConfigError, RecursionError) as exc:
        why = "--config is nested too deep" if isinstance(exc, RecursionError) else exc
        print(f"error: {why}", file=sys.stderr)
        return 2
    context = Context(args.job)
    try:
        job_.function(context, config)
    except Exception:
        traceback.print_exc()
        return 1
    return 0


def _no_constant(name: str) -> None:
    """JSON has no NaN or infinity: Python's reader takes them, and a NaN passes every
    ``minimum`` and ``maximum``."""
    raise ValueError(f"--config holds {name}, which JSON has no number for")


if __name__ == "__main__":
    sys.exit(main())
