"""The emulator's summary as one self-contained HTML page with a plot (PNG as a data: URI).

``python -m tools.emulate_device --report out.json`` writes ``out.html`` beside the JSON with
:func:`write_report_html`: the key figures, the latency of each pipeline stage (p50 and p95) and of
Ingest, and where the signals and utterances went. Nothing is fetched and nothing runs: inline CSS, one
embedded image, and a Content-Security-Policy that forbids the rest. Transcripts are never shown.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any

#: Pipeline stages in the order an utterance goes through them.
STAGE_ORDER = ("audio", "vad", "asr", "classify", "filter", "ldp")

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; padding: 12px;
  background: #fbfbf8; color: #1d1d1b; }
main { max-width: 60rem; margin: 0 auto; }
h1 { font-size: 1.35rem; } h2 { font-size: 1.05rem; margin-top: 1.4rem; }
table { border-collapse: collapse; font-size: .92rem; background: #fff; }
th, td { text-align: left; padding: .3rem .6rem; border-bottom: 1px solid #e8e8e2; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; border: 1px solid #e8e8e2; background: #fff; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def signal_outcomes(summary: dict[str, Any]) -> dict[str, int]:
    """Where the signals went: withheld by the budget, acknowledged, and the outbox's other exits."""
    outbox = summary.get("outbox", {})
    return {
        "withheld by the daily budget": int(summary.get("signals_withheld_by_budget", 0)),
        "acknowledged": int(outbox.get("signals_acknowledged", summary.get("signals_sent", 0))),
        "set aside (refused)": int(outbox.get("signals_set_aside", 0)),
        "dropped (outbox bounds)": int(outbox.get("signals_dropped_overflow", 0))
        + int(outbox.get("signals_dropped_age", 0)),
        "purged": int(outbox.get("signals_purged", 0)),
        "still queued": int(outbox.get("queued_signals", 0)),
    }


def utterance_outcomes(summary: dict[str, Any]) -> dict[str, int]:
    """Utterances that yielded signals, and the others by drop reason."""
    dropped = {f"dropped: {k}": int(v) for k, v in summary.get("dropped", {}).items()}
    kept = int(summary.get("utterances", 0)) - sum(dropped.values())
    return {"yielded signals": kept, **dropped}


def render_plot(summary: dict[str, Any]) -> bytes:
    """A PNG: latency per stage (p50, p95), signals by outcome, utterances by outcome."""
    import matplotlib

    matplotlib.use("Agg")  # no display; selected before pyplot is imported
    import matplotlib.pyplot as plt

    stages = summary.get("stages_ms", {})
    names = [s for s in STAGE_ORDER if s in stages] + sorted(set(stages) - set(STAGE_ORDER))
    latency = [(f"stage: {s}", stages[s]["p50"], stages[s]["p95"]) for s in names]
    latency.append(("whole pipeline", summary.get("pipeline_ms_p50"), summary.get("pipeline_ms_p95")))
    latency.append(("Ingest (p50, p99)", summary.get("ingest_ms_p50"), summary.get("ingest_ms_p99")))
    latency = [(label, lo or 0.0, hi or 0.0) for label, lo, hi in latency]
    # Zero-length bars vanish on a log axis; anything under 10 microseconds is drawn at that floor.
    latency = [(label, max(lo, 0.01), max(hi, 0.01)) for label, lo, hi in latency]

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), dpi=80)
    ax = axes[0]
    y = list(range(len(latency)))
    ax.barh([v - 0.2 for v in y], [r[1] for r in latency], height=0.4, label="p50", color="#3b7dd8")
    ax.barh([v + 0.2 for v in y], [r[2] for r in latency], height=0.4, label="p95", color="#f0a23b")
    ax.set_yticks(y, [r[0] for r in latency])
    ax.invert_yaxis()
    # Stages differ by orders of magnitude (ASR takes seconds, the filter microseconds): a log axis.
    ax.set_xscale("log")
    ax.set_xlim(left=0.01)
    for i, row in enumerate(latency):
        ax.annotate(
            f"{row[1]:,.0f}" if row[1] >= 10 else f"{row[1]:.2g}",
            (row[1], i - 0.2),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=7,
        )
    ax.set_title("Latency per stage (ms, log scale)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    for ax, data, title, color in (
        (axes[1], signal_outcomes(summary), "Signals by outcome", "#4c9a5b"),
        (axes[2], utterance_outcomes(summary), "Utterances by outcome", "#8a6bbf"),
    ):
        labels = list(data)
        ax.barh(labels, [data[k] for k in labels], color=color)
        ax.invert_yaxis()
        ax.set_title(title)
        for i, k in enumerate(labels):
            ax.annotate(str(data[k]), (data[k], i), xytext=(3, 0), textcoords="offset points", va="center")
        ax.margins(x=0.15)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def render_report_html(summary: dict[str, Any]) -> str:
    """The page for an emulator summary (the ``--report`` JSON document)."""
    png = base64.b64encode(render_plot(summary)).decode("ascii")
    epsilon = summary.get("ldp_epsilon")
    figures = [
        ("mode", summary.get("mode")),
        ("devices", summary.get("devices")),
        ("utterances", summary.get("utterances")),
        ("signals produced (before local privacy)", summary.get("signals_produced")),
        ("local differential privacy", f"epsilon {epsilon:g}" if epsilon else "off"),
        ("signals sent (acknowledged)", summary.get("signals_sent")),
        ("batches sent / pending", f"{summary.get('batches_sent')} / {summary.get('batches_pending')}"),
        ("bytes per signal on the wire", summary.get("bytes_per_signal") or "-"),
        (
            "pipeline latency p50 / p95",
            f"{_ms(summary.get('pipeline_ms_p50'))} / {_ms(summary.get('pipeline_ms_p95'))}",
        ),
        (
            "Ingest latency p50 / p99",
            f"{_ms(summary.get('ingest_ms_p50'))} / {_ms(summary.get('ingest_ms_p99'))}",
        ),
        ("wall time", f"{summary.get('wall_s')} s"),
    ]
    if "kills" in summary:
        figures.append(("device processes killed (SIGKILL)", summary["kills"]))
    rows = "".join(f'<tr><th>{_e(k)}</th><td class="n">{_e(v)}</td></tr>' for k, v in figures)
    stages = summary.get("stages_ms", {})
    stage_rows = "".join(
        f'<tr><td>{_e(s)}</td><td class="n">{_e(_ms(v.get("p50")))}</td>'
        f'<td class="n">{_e(_ms(v.get("p95")))}</td></tr>'
        for s, v in stages.items()
    )
    return (
        "\n".join(
            [
                "<!DOCTYPE html>",
                '<html lang="en"><head><meta charset="utf-8">',
                '<meta name="viewport" content="width=device-width, initial-scale=1">',
                '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
                "style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'\">",
                "<title>Sotto device emulator: summary</title>",
                f"<style>{_CSS}</style></head><body><main>",
                "<h1>Sotto device emulator: summary</h1>",
                f"<table><tbody>{rows}</tbody></table>",
                "<h2>Latency and outcomes</h2>",
                f'<img alt="Latency per stage; signals and utterances by outcome" '
                f'src="data:image/png;base64,{png}">',
                "<h2>Latency per stage</h2>",
                "<table><thead><tr><th>stage</th><th>p50</th><th>p95</th></tr></thead>"
                f"<tbody>{stage_rows}</tbody></table>",
                "</main></body></html>",
            ]
        )
        + "\n"
    )


def write_report_html(summary: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write :func:`render_report_html` to ``path`` (atomically) and return it."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(render_report_html(summary), encoding="utf-8")
    os.replace(tmp, target)
    return target
