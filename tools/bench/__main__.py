"""Benchmarks: where the time, the memory and the bytes go, on the device and on the aggregator.

    python -m tools.bench edge-latency            # end of audio -> signals ready, per stage, p50/p95
    python -m tools.bench edge-memory             # peak RSS of a process with every model, load time
    python -m tools.bench wire-size               # bytes per batch and per signal, against compact JSON
    python -m tools.bench aggregator --store sqlite --store postgresql   # signals/s, Ingest p50/p99
    python -m tools.bench side-by-side            # the pipeline's defaults against the alternatives
    python -m tools.bench scale --workers 1,2     # signals/s, server CPU s per 10^4 signals, by workers
    python -m tools.bench plot                    # PNG plots from the JSON results
    python -m tools.bench all                     # every benchmark, then the plots
    python -m tools.bench speed                   # on-device speed against bare faster-whisper (speed.py)
    python -m tools.bench outbox                  # the device outbox: a durable add, the disk it takes
    python -m tools.bench load --target HOST:PORT --tokens tokens.json   # the aggregator benchmarks' load

Each benchmark prints a table and writes ``<name>.json`` into ``--out`` (default ``bench-results/``).
``--smoke`` runs a tiny version of it (CI uses that to check that the benchmark runs and that its output
is well-formed; its numbers mean nothing). The JSON shape is checked by ``tools.bench.validate_result``.

One module per benchmark (``edge_latency``, ``edge_memory``, ``wire_size``, ``aggregator``,
``side_by_side``, ``scale``; each with ``run(args)`` and ``table(document)``), and shared ones: ``results``
(the result schema), ``speech`` (synthetic and recorded utterances), ``servers`` (store, server, load
generator processes), ``plots``. ``speed``, ``outbox`` and ``load`` have command lines of their own.

Timings depend on what else the machine is doing: every result records the load average before and
after the run, and BENCHMARKS.md says how the published figures were taken.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sotto.edge.asr import AsrOptions
from sotto.edge.classifier import BACKENDS
from tools.bench.plots import plot
from tools.bench.results import BENCHMARKS, validate_result, write_result
from tools.bench.scale import add_arguments as scale_arguments

Runner = Callable[[argparse.Namespace], tuple[dict[str, Any], dict[str, Any]]]
Table = Callable[[dict[str, Any]], list[tuple[str, list[str], list[list[str]]]]]
#: The benchmarks that write a result document, by name: their modules (imported when used, so that the
#: load generator's process does not load the device's models).
MODULES = {
    "edge-latency": "tools.bench.edge_latency",
    "edge-memory": "tools.bench.edge_memory",
    "wire-size": "tools.bench.wire_size",
    "aggregator": "tools.bench.aggregator",
    "side-by-side": "tools.bench.side_by_side",
    "scale": "tools.bench.scale",
}
#: Subcommands with a command line of their own: ``main(argv)`` of these modules.
OWN_COMMAND_LINE = {"speed": "tools.bench.speed", "outbox": "tools.bench.outbox", "load": "tools.bench.load"}


def benchmark(name: str) -> tuple[Runner, Table]:
    """The ``run`` and ``table`` functions of benchmark ``name``."""
    module = importlib.import_module(MODULES[name])
    return module.run, module.table


def print_tables(document: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table as RichTable

    # Wide enough for every table when the output is a file or a pipe (CI logs, tee).
    console = Console(width=None if sys.stdout.isatty() else 140)
    _, table = benchmark(document["benchmark"])
    for title, header, rows in table(document):
        view = RichTable(title=title, title_justify="left")
        for n, name in enumerate(header):
            view.add_column(name, justify="left" if n == 0 else "right")
        for row in rows:
            view.add_row(*row)
        console.print(view)
    for target in document["targets"]:
        mark = "[green]met[/green]" if target["met"] else "[red]missed[/red]"
        console.print(f"  target {target['description']}: {target['value']:.2f} ({target['target']}) {mark}")
    if document["smoke"]:
        console.print("  (smoke run: the numbers say nothing)")


def run_benchmark(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one benchmark, write its JSON into ``args.out``, print its table; returns the document."""
    started = time.time()
    runner, _ = benchmark(name)
    load_before = list(os.getloadavg())
    config, results = runner(args)
    config["load_average_before"] = load_before
    document = write_result(args.out, name, args.smoke, config, results, started)
    validate_result(document)
    print_tables(document)
    return document


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for the JSON results")
    parser.add_argument("--smoke", action="store_true", help="tiny run that checks the benchmark works")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per utterance")
    parser.add_argument("--threads", type=int, default=AsrOptions().cpu_threads, help="ASR CPU threads")
    parser.add_argument("--seed", type=int, default=7)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name in (*BENCHMARKS, "all"):
        sub = commands.add_parser(name, help=f"run {'every benchmark' if name == 'all' else name}")
        _add_common(sub)
        if name in ("edge-latency", "all"):
            sub.add_argument("--lengths", default="2,5,10", help="synthetic utterance lengths in seconds")
        if name in ("edge-memory", "all"):
            sub.add_argument("--queries", type=int, default=50, help="utterances analysed")
        if name in ("aggregator", "all"):
            sub.add_argument(
                "--store",
                action="append",
                choices=("sqlite", "postgresql"),
                help="store to benchmark (repeatable; default sqlite; `all` runs both)",
            )
            sub.add_argument("--devices", type=int, default=100, help="concurrent devices")
            sub.add_argument(
                "--rates",
                default="2000,5000,10000,15000,20000,25000",
                help="offered signals/s of the open-loop runs (the target rate is always added)",
            )
            sub.add_argument("--batch-size", type=int, default=20)
            sub.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
            sub.add_argument("--warmup", type=float, default=2.0)
            sub.add_argument("--postgres-url", help="PostgreSQL server (a fresh schema is used and dropped)")
        if name in ("scale", "all"):
            scale_arguments(sub, load_options=name == "scale")
    plot_cmd = commands.add_parser("plot", help="PNG plots from JSON results")
    plot_cmd.add_argument("--results", type=Path, default=Path("bench-results"))
    plot_cmd.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: --results)")
    child = commands.add_parser("_memory-child", help=argparse.SUPPRESS)
    child.add_argument("folder", type=Path)
    child.add_argument("queries", type=int)
    classifier_child = commands.add_parser("_classifier-child", help=argparse.SUPPRESS)
    classifier_child.add_argument("backend", choices=BACKENDS)
    classifier_child.add_argument("queries", type=int)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in OWN_COMMAND_LINE:
        own: Callable[[list[str]], int] = importlib.import_module(OWN_COMMAND_LINE[argv[0]]).main
        return own(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "_memory-child":
        from tools.bench.edge_memory import memory_child

        json.dump(memory_child(args.folder, args.queries), sys.stdout)
        return 0
    if args.command == "_classifier-child":
        from tools.bench.edge_memory import classifier_child

        json.dump(classifier_child(args.backend, args.queries), sys.stdout)
        return 0
    if args.command == "plot":
        for path in plot(args.results, args.out or args.results):
            print(path)
        return 0
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1")
    if getattr(args, "devices", 1) < 1 or getattr(args, "batch_size", 1) < 1:
        parser.error("--devices and --batch-size must be at least 1")
    names = BENCHMARKS if args.command == "all" else (args.command,)
    if args.command == "all" and not args.store:
        args.store = ["sqlite", "postgresql"]
    for name in names:
        run_benchmark(name, args)
    if args.command == "all":
        for path in plot(args.out, args.out):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
