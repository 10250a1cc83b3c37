"""PNG plots from the JSON results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tools.extras import need


def _save(fig, ax, path: Path) -> Path:  # type: ignore[no-untyped-def]
    """Legend, layout, PNG, and the figure closed: the same finish for every plot."""
    import matplotlib.pyplot as plt

    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(results: Path, out: Path) -> list[Path]:
    """PNG plots from the JSON results in ``results``: latency vs utterance length, and aggregator
    latency vs load. Returns the files written (a plot whose results are missing is skipped)."""
    need("matplotlib", "tools", "python -m tools.bench plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    latency = results / "edge-latency.json"
    if latency.is_file():
        rows = sorted(json.loads(latency.read_text())["results"]["utterances"], key=lambda r: r["audio_s"])
        fig, ax = plt.subplots(figsize=(7, 4.2))
        x = [r["audio_s"] for r in rows]
        bottom = np.zeros(len(rows))
        for stage in ("vad", "asr", "classify", "filter", "encode"):
            values = np.array([r["stages_ms"][stage]["p50"] for r in rows])
            ax.bar(x, values, width=0.35, bottom=bottom, label=f"{stage} (p50)")
            bottom += values
        ax.errorbar(
            x,
            [r["total_ms"]["p50"] for r in rows],
            yerr=[[0] * len(rows), [r["total_ms"]["p95"] - r["total_ms"]["p50"] for r in rows]],
            fmt="ko",
            capsize=3,
            label="total p50 (bar to p95)",
        )
        ax.axhline(400, color="grey", linestyle="--", linewidth=1, label="target for 5 s: 400 ms")
        ax.set_xlabel("utterance length (s)")
        ax.set_ylabel("end of audio -> signals ready (ms)")
        ax.set_title("Edge latency against utterance length")
        written.append(_save(fig, ax, out / "edge_latency_vs_length.png"))
    aggregator = results / "aggregator.json"
    if aggregator.is_file():
        runs = json.loads(aggregator.read_text())["results"]["runs"]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for store in sorted({r["store"] for r in runs}):
            mine = sorted(
                (r for r in runs if r["store"] == store and r["mode"] == "open"),
                key=lambda r: r["signals_per_s"],
            )
            thr = [r["signals_per_s"] for r in mine]
            line = ax.plot(thr, [r["latency_ms"]["p50"] for r in mine], "o-", label=f"{store} p50")[0]
            ax.plot(
                thr,
                [r["latency_ms"]["p99"] for r in mine],
                "s--",
                color=line.get_color(),
                label=f"{store} p99",
            )
            closed = [r for r in runs if r["store"] == store and r["mode"] == "closed"]
            for r in closed:
                ax.axvline(r["signals_per_s"], color=line.get_color(), linestyle=":", linewidth=1)
                ax.annotate(
                    f"{store} capacity",
                    (r["signals_per_s"], 1),
                    rotation=90,
                    fontsize=7,
                    color=line.get_color(),
                )
        ax.set_xlabel("offered signals/s (open loop; dotted: closed-loop capacity)")
        ax.set_ylabel("Ingest latency (ms)")
        ax.set_yscale("log")
        ax.set_title("Aggregator latency against load")
        written.append(_save(fig, ax, out / "aggregator_latency_vs_load.png"))
    return written
