"""``sotto-server``: run the aggregator (``serve``), query or erase profiles on a running one (``profile``,
``delete``, ``audience``) and manage bearer tokens in its database (``token issue``, ``token revoke``)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection

import grpc
from google.protobuf.message import Message

from sotto.policy import Policy
from sotto.server.admin import AdminConnection
from sotto.server.auth import admin_credential, device_credential, new_token
from sotto.server.config import ServerConfig, ServerTls
from sotto.server.limits import ensure_open_files
from sotto.server.store import Role, Store, StoreError, open_store, sqlite_path
from sotto.server.validation import validate_profile_id
from sotto.v1 import signals_pb2, signals_pb2_grpc

EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TRUE_WORDS = ("1", "true", "yes", "on")
#: What ``serve`` imports from the 'server' extra (health checking, reflection, Prometheus metrics).
SERVER_EXTRA_MODULES = ("grpc_health", "grpc_reflection", "prometheus_client")


def missing_server_extra() -> str | None:
    """The first module of the 'server' extra that cannot be imported; None when all are installed."""
    for name in SERVER_EXTRA_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            return name
    return None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the ``None`` and ``False`` of options whose help explains the fallback."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


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


def _env_name(flag: str) -> str:
    return "SOTTO_" + flag.removeprefix("--").replace("-", "_").upper()


def _option(
    parser: argparse.ArgumentParser,
    flag: str,
    metavar: str,
    default: str | None,
    help: str,
    parse: Callable[[str], object] = str,
) -> None:
    """An option whose default comes from $SOTTO_<FLAG> when set (argparse applies ``parse`` to it too)."""
    env = _env_name(flag)
    parser.add_argument(
        flag, metavar=metavar, type=parse, default=os.environ.get(env, default), help=f"{help} [env {env}]"
    )


def _switch(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """A flag that $SOTTO_<FLAG>=1 (or true, yes, on) also turns on."""
    env = _env_name(flag)
    parser.add_argument(
        flag,
        action="store_true",
        default=os.environ.get(env, "").lower() in TRUE_WORDS,
        help=f"{help} [env {env}=1]",
    )


def _add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the aggregator until SIGTERM or SIGINT",
        description="Run the aggregator; prints 'listening on HOST:PORT' to stdout once bound (and "
        "'metrics on http://HOST:PORT/metrics' when --metrics-listen is set). Every call needs a "
        "credential: a bearer token from `sotto-server token issue`, or a client certificate.",
        formatter_class=_HelpFormatter,
    )
    _option(
        serve,
        "--db",
        "URL",
        "sqlite:///sotto.db",
        "store: sqlite:///relative.db, sqlite:////absolute.db, a bare path, or "
        "postgresql://USER:PASSWORD@HOST:5432/DBNAME (schema migrations are applied on start)",
    )
    _option(
        serve, "--listen", "HOST:PORT", "127.0.0.1:50051", "address to bind; port 0 picks one", _host_port
    )
    _option(serve, "--tls-cert", "FILE", None, "PEM certificate chain of the server; turns TLS on")
    _option(serve, "--tls-key", "FILE", None, "PEM private key of the server")
    _option(
        serve,
        "--tls-client-ca",
        "FILE",
        None,
        "PEM CA of device certificates; turns mutual TLS on (every client must present a certificate)",
    )
    _switch(
        serve,
        "--insecure",
        "serve plaintext on a non-loopback address (only behind a proxy that terminates TLS)",
    )
    _option(
        serve,
        "--metrics-listen",
        "HOST:PORT",
        None,
        "serve Prometheus metrics over HTTP at http://HOST:PORT/metrics (default: off)",
        _host_port,
    )
    _option(
        serve,
        "--half-life-days",
        "DAYS",
        "30",
        "half-life of interest scores; fixed when the database is created",
        _number(float, 0, exclusive=True),
    )
    _option(
        serve,
        "--retention-days",
        "DAYS",
        "180",
        "entries not reinforced for this long are purged, and older batches refused",
        _number(int, 1),
    )
    _option(
        serve,
        "--purge-interval-seconds",
        "SECONDS",
        "3600",
        "time between retention purges (the first runs at start)",
        _number(float, 1),
    )
    _option(
        serve,
        "--min-audience",
        "K",
        "50",
        "AudienceSize reports no count below K profiles (k-anonymity)",
        _number(int, 2),
    )
    _option(
        serve,
        "--max-ldp-epsilon",
        "EPSILON",
        None,
        "accept only batches noised with local differential privacy at this epsilon or lower "
        "(default: accept noised and plain batches)",
        _number(float, 0, exclusive=True),
    )
    _option(serve, "--max-signals-per-batch", "N", "100", "larger batches are rejected", _number(int, 1))
    _option(serve, "--max-message-bytes", "N", "65536", "largest request accepted", _number(int, 1024))
    _option(
        serve,
        "--rate-per-second",
        "R",
        "1",
        "calls per second each device may make, sustained",
        _number(float, 0, exclusive=True),
    )
    _option(serve, "--rate-burst", "N", "60", "calls a device may make at once", _number(int, 1))
    _option(
        serve,
        "--max-concurrent-rpcs",
        "N",
        "1000",
        "authenticated calls in progress at once, over all clients (health checks do not count)",
        _number(int, 1),
    )
    _option(
        serve,
        "--max-streams-per-connection",
        "N",
        "100",
        "HTTP/2 streams one connection may have open at once",
        _number(int, 1),
    )
    _option(
        serve,
        "--max-connections",
        "N",
        "10000",
        "connections kept open at once, per process; gRPC closes one more as soon as it is accepted "
        "(the open-file limit is raised to fit)",
        _number(int, 1),
    )
    _option(
        serve,
        "--unauthenticated-delay-seconds",
        "SECONDS",
        "1",
        "time a call without a valid credential waits for its refusal (at most 100 wait at once)",
        _number(float, 0),
    )
    _option(
        serve,
        "--request-timeout-seconds",
        "SECONDS",
        "10",
        "longest time spent on one call",
        _number(float, 0, exclusive=True),
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
        serve,
        "--workers",
        "N",
        "1",
        "processes serving the same port (SO_REUSEPORT), each with its own event loop and store "
        "connections; metrics are merged over them",
        _number(int, 1),
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


def _admin_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str, description: str
) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help, description=description, formatter_class=_HelpFormatter)
    _option(parser, "--target", "HOST:PORT", "127.0.0.1:50051", "aggregator address", _host_port)
    _option(parser, "--admin-token-file", "FILE", None, "file holding an admin token (required)")
    _option(
        parser,
        "--tls-ca",
        "FILE",
        None,
        "PEM CA that signed the server certificate (default: the system's roots when TLS is on)",
    )
    _option(parser, "--tls-client-cert", "FILE", None, "PEM client certificate, when the server asks for one")
    _option(parser, "--tls-client-key", "FILE", None, "PEM key of the client certificate")
    _switch(
        parser,
        "--insecure",
        "plaintext even to a non-loopback target (TLS is used for those by default)",
    )
    _option(parser, "--timeout", "SECONDS", "10", "RPC deadline", _number(float, 0, exclusive=True))
    return parser


def _add_admin(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    profile = _admin_parser(
        commands,
        "profile",
        "print one profile as JSON",
        "Print a profile's decayed scores as JSON; exit 3 when there is no such profile.",
    )
    profile.add_argument("profile_id", metavar="PROFILE_ID")
    _option(profile, "--top-k", "N", "0", "at most this many categories (0 = all)", _number(int, 0))
    profile.set_defaults(handler=_profile)

    delete = _admin_parser(
        commands,
        "delete",
        "erase one profile (a user's deletion request)",
        'Erase a profile, its batch ids and its device tokens; prints {"deleted": true} when something '
        "was stored, false when there was nothing to erase.",
    )
    delete.add_argument("profile_id", metavar="PROFILE_ID")
    delete.set_defaults(handler=_delete)

    audience = _admin_parser(
        commands,
        "audience",
        "count the profiles interested in a category",
        "Print how many profiles score at least --min-score in CATEGORY_ID, as JSON; the count is null and "
        "too_small true when fewer than the server's minimum audience (k) match.",
    )
    audience.add_argument("category_id", metavar="CATEGORY_ID")
    _option(
        audience,
        "--min-score",
        "SCORE",
        "0",
        "decayed score threshold (a full-weight signal today scores 1.0)",
        _number(float, 0),
    )
    audience.set_defaults(handler=_audience)


def _add_token(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = commands.add_parser(
        "token",
        help="issue or revoke bearer tokens (works on the database directly)",
        description="Issue or revoke bearer tokens in the aggregator's database. Only SHA-256 hashes are "
        "stored; a token is printed once, when it is issued.",
    )
    actions = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help, handler in (
        ("issue", "issue tokens: JSON {PROFILE_ID: TOKEN} for devices, the bare token for --admin", _issue),
        ("revoke", "revoke every token of the given profiles, or every admin token", _revoke),
    ):
        action = actions.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)
        action.add_argument("profile_ids", metavar="PROFILE_ID", nargs="*", help="device profiles")
        action.add_argument("--admin", action="store_true", help="admin tokens instead of device tokens")
        _option(action, "--db", "URL", "sqlite:///sotto.db", "the aggregator's store")
        action.set_defaults(handler=handler)


def _add_minor(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    minor = commands.add_parser(
        "minor",
        help="mark profiles as minors (erasing their signals), unmark them, or list them",
        description="Mark profiles as minors in the aggregator's database: their stored signals are erased "
        "at once and, wherever the region table's no_minors rule applies, their batches are refused "
        "(FAILED_PRECONDITION). Works on the database directly; prints JSON.",
        formatter_class=_HelpFormatter,
    )
    minor.add_argument("profile_ids", metavar="PROFILE_ID", nargs="*", help="profiles to mark (or unmark)")
    minor.add_argument("--unmark", action="store_true", help="remove the mark instead")
    minor.add_argument("--list", action="store_true", help="list the marked profiles")
    _option(minor, "--db", "URL", "sqlite:///sotto.db", "the aggregator's store")
    minor.set_defaults(handler=_minor)


def _add_cluster(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cluster = commands.add_parser(
        "cluster",
        help="define the sharded store's PL/Proxy cluster, show it, or move a partition",
        description="The sharded store (--db plproxy://USER:PASSWORD@HOST:PORT/PROXYDB?cluster=NAME): "
        "create its cluster of partitions over shard databases, show it, move a partition to another "
        "database (its profiles answer UNAVAILABLE while it moves), or lift the pause a failed move left. "
        "Prints JSON.",
    )
    actions = cluster.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create",
        help="create the cluster: partitions spread round-robin over the shard databases",
        formatter_class=_HelpFormatter,
    )
    create.add_argument("shard_urls", metavar="SHARD_URL", nargs="+", help="postgresql:// URLs of the shards")
    create.add_argument("--partitions", type=int, default=8, help="how many partitions (a power of two)")
    move = actions.add_parser(
        "move", help="move one partition to another shard database", formatter_class=_HelpFormatter
    )
    move.add_argument("--partition", type=int, required=True, help="the partition's number")
    move.add_argument(
        "--to", metavar="SHARD_URL", required=True, help="postgresql:// URL of the new database"
    )
    resume = actions.add_parser(
        "resume", help="lift the pause of a partition after a failed move", formatter_class=_HelpFormatter
    )
    resume.add_argument("--partition", type=int, required=True, help="the partition's number")
    show = actions.add_parser(
        "show", help="the partitions and where they are", formatter_class=_HelpFormatter
    )
    for action in (create, move, resume, show):
        _option(action, "--db", "URL", None, "the sharded store's plproxy:// URL")
        action.set_defaults(handler=_cluster)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``sotto-server``."""
    parser = argparse.ArgumentParser(
        prog="sotto-server",
        description="Sotto aggregator: merges on-device interest signals into decaying profiles.",
        epilog="Every option can also be set by the environment variable shown in brackets.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(commands)
    _add_admin(commands)
    _add_token(commands)
    _add_minor(commands)
    _add_cluster(commands)
    return parser


# --- serve ------------------------------------------------------------------------------------------


def _server_config(args: argparse.Namespace) -> ServerConfig:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("give both --tls-cert and --tls-key, or neither")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    return ServerConfig(
        policy=Policy.load(args.models),
        max_signals_per_batch=args.max_signals_per_batch,
        max_receive_message_bytes=args.max_message_bytes,
        require_auth=True,
        tls=None
        if args.tls_cert is None
        else ServerTls.from_files(args.tls_cert, args.tls_key, args.tls_client_ca),
        insecure=args.insecure,
        rate_per_second=args.rate_per_second,
        rate_burst=args.rate_burst,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_streams_per_connection=args.max_streams_per_connection,
        max_connections=args.max_connections,
        unauthenticated_delay_s=args.unauthenticated_delay_seconds,
        request_timeout_s=args.request_timeout_seconds,
        retention_days=args.retention_days,
        purge_interval_s=args.purge_interval_seconds,
        min_audience=args.min_audience,
        max_ldp_epsilon=args.max_ldp_epsilon,
    )


async def _warn_without_device_tokens(store: Store) -> None:
    """Say loudly when no device could authenticate: most often the store URL points to a new, empty
    database (a typo in a SQLite path creates one) rather than to the one the tokens were issued in."""
    if await store.count_credentials(Role.DEVICE):
        return
    message = (
        "the store holds no device token, so every device is refused until one is issued "
        "(sotto-server token issue --db URL PROFILE_ID); if tokens were issued, check that --db names "
        "that database: a new, empty one is created at any other SQLite path"
    )
    logging.getLogger("sotto.server.cli").warning("event=no_device_tokens %s", message)
    print(f"sotto-server: warning: {message}", file=sys.stderr, flush=True)


async def _run_server(
    args: argparse.Namespace, config: ServerConfig, on_ready: Callable[[int], None] | None = None
) -> None:
    """Serve until SIGTERM/SIGINT. ``on_ready(port)`` replaces the "listening on" line (workers)."""
    from sotto.server.service import create_server  # needs the 'server' extra, checked by _serve

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):  # installed first: a signal during startup still drains
        loop.add_signal_handler(signum, stop.set)
    store = await open_store(args.db, args.half_life_days)
    try:
        if on_ready is None and (config.tls is None or config.tls.client_ca is None):
            await _warn_without_device_tokens(store)  # once, by the parent, under --workers
        server, port = await create_server(args.listen, store, config)
        exporter = None
        try:
            if on_ready is not None:
                on_ready(port)
            else:
                print(f"listening on {args.listen.rpartition(':')[0]}:{port}", flush=True)
            if args.metrics_listen is not None:
                host, _, metrics_port = args.metrics_listen.rpartition(":")
                exporter = server.metrics.serve(host, int(metrics_port))
                print(f"metrics on http://{host}:{exporter.port}/metrics", flush=True)
            await stop.wait()
        finally:
            await server.stop(args.grace_seconds)
            if exporter is not None:
                exporter.close()
    finally:
        await store.close()


def _configure_logging(args: argparse.Namespace, worker: int | None = None) -> None:
    level = logging.getLevelName(args.log_level)
    # Under --workers every line says which process wrote it (the parent's lines have no worker=).
    where = "" if worker is None else f"worker={worker} "
    # DEBUG is for our own loggers; grpc's and asyncio's debug output would drown it.
    logging.basicConfig(
        stream=sys.stderr,
        level=max(level, logging.INFO),
        format=f"%(asctime)s level=%(levelname)s logger=%(name)s {where}%(message)s",
    )
    logging.getLogger("sotto.server").setLevel(level)


def _serve(args: argparse.Namespace) -> int:
    missing = missing_server_extra()
    if missing is not None:
        return _fail(
            f"serving needs the 'server' extra, which is not installed (no module named {missing!r}): "
            "pip install 'sotto[server]'"
        )
    _configure_logging(args)
    try:
        try:  # before the workers start: they inherit the limit
            ensure_open_files(args.max_connections)
        except ValueError as exc:
            raise ValueError(
                f"--max-connections {args.max_connections}: {exc}; raise the limit (ulimit -n, or "
                "LimitNOFILE= in a systemd unit) or lower --max-connections"
            ) from None
        if args.workers > 1:
            return _serve_workers(args)
        asyncio.run(_run_server(args, _server_config(args)))
    except ValueError as exc:  # configuration: models, TLS files, store URL, half-life, unsafe address
        return _fail(str(exc), EXIT_USAGE)
    except RuntimeError as exc:  # cannot bind an address
        return _fail(str(exc))
    except StoreError as exc:  # the database is unreachable while migrating
        return _fail(str(exc))
    return 0


async def _migrate(args: argparse.Namespace, config: ServerConfig) -> None:
    store = await open_store(args.db, args.half_life_days)
    try:
        if config.tls is None or config.tls.client_ca is None:
            await _warn_without_device_tokens(store)
    finally:
        await store.close()


def _serve_workers(args: argparse.Namespace) -> int:
    """``serve --workers N`` (N > 1): check the configuration and migrate the store once, here, so that a
    mistake is reported once and N processes never race to migrate; then run the workers."""
    from sotto.server.workers import run_workers

    config = _server_config(args)
    if (args.db.startswith("sqlite:") or "://" not in args.db) and sqlite_path(args.db) == ":memory:":
        raise ValueError(
            "--workers needs a store the workers share; sqlite:///:memory: would give each its own"
        )
    asyncio.run(_migrate(args, config))
    return run_workers(args, args.workers, serve_worker, args.grace_seconds)


def serve_worker(index: int, args: argparse.Namespace, ready: Connection) -> None:
    """One worker process of ``serve --workers N`` (see ``sotto.server.workers``): binds the shared port,
    reports ``("ready", port)`` or ``("error", exit_code, message)`` on ``ready``, serves until SIGTERM."""
    _configure_logging(args, index)
    code = 0
    try:
        config = _server_config(args)
        config = dataclasses.replace(
            config,
            reuse_port=True,
            # One purge is enough: worker 0 runs it, the others never do.
            purge_interval_s=config.purge_interval_s if index == 0 else 0.0,
        )
        asyncio.run(_run_server(args, config, lambda port: ready.send(("ready", port))))
    except ValueError as exc:
        code, message = EXIT_USAGE, str(exc)
    except (RuntimeError, StoreError) as exc:
        code, message = 1, str(exc)
    if code:
        ready.send(("error", code, message))
        ready.close()
        sys.exit(code)
    ready.close()


# --- admin calls against a running server ------------------------------------------------------------


def _call(args: argparse.Namespace, method: str, request: Message) -> tuple[int, Message | None]:
    """Call ``method`` with the admin token; an exit code and the reply (None after an error)."""
    try:
        connection = AdminConnection.from_options(
            args.target,
            args.admin_token_file,
            args.tls_ca,
            args.tls_client_cert,
            args.tls_client_key,
            args.insecure,
        )
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE), None
    with connection.channel() as channel:
        stub = signals_pb2_grpc.SignalAggregatorStub(channel)
        try:
            reply = getattr(stub, method)(request, timeout=args.timeout, metadata=connection.metadata)
        except grpc.RpcError as exc:
            # grpc's blocking errors are also grpc.Call objects, which its type hints do not say.
            code, details = exc.code(), exc.details()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.NOT_FOUND:
                return _fail("no such profile", EXIT_NOT_FOUND), None
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                return _fail(details, EXIT_USAGE), None
            return _fail(f"{method} on {args.target} failed: {code.name}: {details}"), None
    return 0, reply


def _profile(args: argparse.Namespace) -> int:
    code, reply = _call(
        args, "GetProfile", signals_pb2.GetProfileRequest(profile_id=args.profile_id, top_k=args.top_k)
    )
    if not isinstance(reply, signals_pb2.Profile):
        return code
    document = {
        "profile_id": reply.profile_id,
        "taxonomy_version": reply.taxonomy_version,
        "as_of_day": reply.as_of_day,
        "batches": reply.batches,
        "scores": [
            {"id": s.category_id, "name": s.name, "tier1": s.tier1, "score": s.score} for s in reply.scores
        ],
    }
    print(json.dumps(document, indent=2))
    return 0


def _delete(args: argparse.Namespace) -> int:
    code, reply = _call(args, "DeleteProfile", signals_pb2.DeleteProfileRequest(profile_id=args.profile_id))
    if not isinstance(reply, signals_pb2.DeleteProfileResponse):
        return code
    print(json.dumps({"profile_id": args.profile_id, "deleted": reply.deleted}))
    return 0


def _audience(args: argparse.Namespace) -> int:
    request = signals_pb2.AudienceSizeRequest(category_id=args.category_id, min_score=args.min_score)
    code, reply = _call(args, "AudienceSize", request)
    if not isinstance(reply, signals_pb2.AudienceSizeResponse):
        return code
    document = {
        "category_id": args.category_id,
        "min_score": args.min_score,
        "as_of_day": reply.as_of_day,
        "profiles": None if reply.too_small else reply.profiles,
        "too_small": reply.too_small,
        "min_audience": reply.min_audience,
        # De-biased for local differential privacy; null with too_small.
        "estimated_signals": None if reply.too_small else reply.estimated_signals,
        "estimate_interval": None if reply.too_small else [reply.estimate_low, reply.estimate_high],
        "confidence": None if reply.too_small else reply.confidence,
        "noised_signals": None if reply.too_small else reply.noised_signals,
    }
    print(json.dumps(document))
    return 0


# --- tokens, on the database directly -----------------------------------------------------------------


def _check_token_args(args: argparse.Namespace) -> None:
    if args.admin == bool(args.profile_ids):
        raise ValueError("give PROFILE_ID arguments (device tokens) or --admin, not both and not neither")


async def _issue_tokens(args: argparse.Namespace) -> str:
    store = await open_store(args.db, None)
    try:
        if args.admin:
            token = new_token()
            await store.add_credential(admin_credential(token))
            return token
        tokens = {profile: new_token() for profile in args.profile_ids}
        credentials = [device_credential(token, profile) for profile, token in tokens.items()]
        for credential in credentials:  # all validated before the first is stored
            await store.add_credential(credential)
        return json.dumps(tokens, indent=2)
    finally:
        await store.close()


def _issue(args: argparse.Namespace) -> int:
    try:
        _check_token_args(args)
        print(asyncio.run(_issue_tokens(args)))
    except ValueError as exc:  # arguments, a malformed profile id, store URL
        return _fail(str(exc), EXIT_USAGE)
    except StoreError as exc:  # the database is unreachable or busy
        return _fail(str(exc))
    return 0


async def _revoke_tokens(args: argparse.Namespace) -> int:
    store = await open_store(args.db, None)
    try:
        if args.admin:
            return await store.revoke_credentials(None)
        return sum([await store.revoke_credentials(profile) for profile in args.profile_ids])
    finally:
        await store.close()


def _revoke(args: argparse.Namespace) -> int:
    try:
        _check_token_args(args)
        print(json.dumps({"revoked": asyncio.run(_revoke_tokens(args))}))
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except StoreError as exc:
        return _fail(str(exc))
    return 0


# --- minors, on the database directly -----------------------------------------------------------------


async def _mark_minors(args: argparse.Namespace) -> dict[str, object]:
    store = await open_store(args.db, None)
    try:
        if args.list:
            return {"minors": await store.minors()}
        erased = {profile: await store.mark_minor(profile, not args.unmark) for profile in args.profile_ids}
        return {"unmarked" if args.unmark else "marked": args.profile_ids, "erased_rows": erased}
    finally:
        await store.close()


def _minor(args: argparse.Namespace) -> int:
    try:
        if args.list == bool(args.profile_ids):
            raise ValueError("give PROFILE_ID arguments or --list, not both and not neither")
        for profile in args.profile_ids:
            validate_profile_id(profile)
        print(json.dumps(asyncio.run(_mark_minors(args))))
    except ValueError as exc:  # arguments, a malformed profile id, store URL
        return _fail(str(exc), EXIT_USAGE)
    except StoreError as exc:
        return _fail(str(exc))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sotto-server`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


# --- the sharded store's cluster ----------------------------------------------------------------------


async def _cluster_action(args: argparse.Namespace) -> object:
    from sotto.server.store import plproxy

    if args.action == "create":
        partitions = await plproxy.create_cluster(args.db, args.shard_urls, args.partitions)
    elif args.action == "move":
        moved = await plproxy.move_partition(args.db, args.partition, args.to)
        return {"moved": moved.number, "schema": moved.schema, "connstr": moved.connstr}
    elif args.action == "resume":
        await plproxy.resume_partition(args.db, args.partition)
        return {"resumed": args.partition}
    else:
        partitions = await plproxy.show_cluster(args.db)
    return {
        "partitions": [{"partition": p.number, "schema": p.schema, "connstr": p.connstr} for p in partitions]
    }


def _cluster(args: argparse.Namespace) -> int:
    try:
        if not args.db or not args.db.startswith("plproxy://"):
            raise ValueError("--db must be the sharded store's plproxy:// URL")
        print(json.dumps(asyncio.run(_cluster_action(args))))
    except ValueError as exc:  # arguments, URL, cluster definition
        return _fail(str(exc), EXIT_USAGE)
    except StoreError as exc:
        return _fail(str(exc))
    return 0
