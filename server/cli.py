"""``sotto-server``: run the aggregator (``serve``) or print one profile (``profile``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

import grpc

from edge.policy import Policy
from server.config import ServerConfig
from server.service import create_server
from server.store import open_store
from sotto.v1 import signals_pb2, signals_pb2_grpc

EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the ``None`` of options whose help explains the fallback."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def _fail(message: str, code: int = 1) -> int:
    print(f"sotto-server: error: {message}", file=sys.stderr)
    return code


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not (sep and host and port.isdigit() and int(port) <= 65535):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, for example 127.0.0.1:50051; got {value!r}")
    return value


def _level(value: str) -> str:
    if value.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOG_LEVELS)}; got {value!r}")
    return value.upper()


def _number(
    kind: Callable[[str], float], minimum: float, *, exclusive: bool = False
) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
        if number < minimum or (exclusive and number == minimum):
            bound = f"greater than {minimum}" if exclusive else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return number

    return parse


def _option(
    parser: argparse.ArgumentParser,
    flag: str,
    metavar: str,
    default: str,
    help: str,
    parse: Callable[[str], object] = str,
) -> None:
    """An option whose default comes from $SOTTO_<FLAG> when set (argparse applies ``parse`` to it too)."""
    env = "SOTTO_" + flag.removeprefix("--").replace("-", "_").upper()
    parser.add_argument(
        flag, metavar=metavar, type=parse, default=os.environ.get(env, default), help=f"{help} [env {env}]"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``sotto-server``."""
    parser = argparse.ArgumentParser(
        prog="sotto-server",
        description="Sotto aggregator: merges on-device interest signals into decaying profiles.",
        epilog="Every option can also be set by the environment variable shown in brackets.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the aggregator until SIGTERM or SIGINT",
        description="Run the aggregator; prints 'listening on HOST:PORT' to stdout once bound.",
        formatter_class=_HelpFormatter,
    )
    _option(
        serve,
        "--db",
        "URL",
        "sqlite:///sotto.db",
        "store: sqlite:///relative.db, sqlite:////absolute.db, sqlite:///:memory: or a bare path",
    )
    _option(
        serve, "--listen", "HOST:PORT", "127.0.0.1:50051", "address to bind; port 0 picks one", _host_port
    )
    _option(
        serve,
        "--half-life-days",
        "DAYS",
        "30",
        "half-life of interest scores; fixed when the database is created",
        _number(float, 0, exclusive=True),
    )
    _option(serve, "--max-signals-per-batch", "N", "100", "larger batches are rejected", _number(int, 1))
    _option(
        serve,
        "--max-message-bytes",
        "N",
        "65536",
        "largest request accepted",
        _number(int, 1024),
    )
    _option(
        serve,
        "--grace-seconds",
        "SECONDS",
        "5",
        "time running requests get at shutdown",
        _number(float, 0),
    )
    _option(
        serve, "--log-level", "LEVEL", "INFO", f"one of {', '.join(LOG_LEVELS)}; logs go to stderr", _level
    )
    # No env lookup here: edge.policy itself falls back to $SOTTO_MODELS_DIR, then the bundled folder.
    serve.add_argument(
        "--models",
        metavar="DIR",
        help="folder with the taxonomy and policy tables [env SOTTO_MODELS_DIR] "
        "(default: the bundled models/)",
    )
    serve.set_defaults(handler=_serve)

    profile = commands.add_parser(
        "profile",
        help="print one profile as JSON",
        description="Print a profile's decayed scores as JSON; exit 3 when there is no such profile.",
        formatter_class=_HelpFormatter,
    )
    profile.add_argument("profile_id", metavar="PROFILE_ID")
    _option(profile, "--target", "HOST:PORT", "127.0.0.1:50051", "aggregator address", _host_port)
    _option(profile, "--top-k", "N", "0", "at most this many categories (0 = all)", _number(int, 0))
    _option(profile, "--timeout", "SECONDS", "10", "RPC deadline", _number(float, 0, exclusive=True))
    profile.set_defaults(handler=_profile)
    return parser


async def _run_server(args: argparse.Namespace, config: ServerConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):  # installed first: a signal during startup still drains
        loop.add_signal_handler(signum, stop.set)
    store = await open_store(args.db, args.half_life_days)
    try:
        server, port = await create_server(args.listen, store, config)
        print(f"listening on {args.listen.rpartition(':')[0]}:{port}", flush=True)
        await stop.wait()
        await server.stop(args.grace_seconds)
    finally:
        await store.close()


def _serve(args: argparse.Namespace) -> int:
    level = logging.getLevelName(args.log_level)
    # DEBUG is for our own loggers; grpc's and asyncio's debug output would drown it.
    logging.basicConfig(
        stream=sys.stderr,
        level=max(level, logging.INFO),
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    logging.getLogger("server").setLevel(level)
    try:
        config = ServerConfig(
            policy=Policy.load(args.models),
            max_signals_per_batch=args.max_signals_per_batch,
            max_receive_message_bytes=args.max_message_bytes,
        )
        asyncio.run(_run_server(args, config))
    except ValueError as exc:  # configuration: models folder, store URL, half-life (incl. StoreConfigError)
        return _fail(str(exc), EXIT_USAGE)
    except RuntimeError as exc:  # cannot bind the address
        return _fail(str(exc))
    return 0


def _profile(args: argparse.Namespace) -> int:
    request = signals_pb2.GetProfileRequest(profile_id=args.profile_id, top_k=args.top_k)
    with grpc.insecure_channel(args.target) as channel:
        try:
            profile = signals_pb2_grpc.SignalAggregatorStub(channel).GetProfile(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.NOT_FOUND:
                return _fail("no such profile", EXIT_NOT_FOUND)
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                return _fail(exc.details(), EXIT_USAGE)
            return _fail(f"GetProfile on {args.target} failed: {code.name}: {exc.details()}")
    document = {
        "profile_id": profile.profile_id,
        "taxonomy_version": profile.taxonomy_version,
        "as_of_day": profile.as_of_day,
        "batches": profile.batches,
        "scores": [
            {"id": s.category_id, "name": s.name, "tier1": s.tier1, "score": s.score} for s in profile.scores
        ],
    }
    print(json.dumps(document, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sotto-server`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)
