"""The wearer's page: "why am I seeing this ad?", answered from what the device itself knows.

:func:`render_page` turns one outbox into a single self-contained HTML page that a companion app shows
(or a wearer opens from a file): every category that left the glasses, per day, and whether it was sent
as heard or noised by local differential privacy (with its epsilon); what the daily privacy budget held
back; how many utterances never produced anything and why (counted by drop reason only); what is still
waiting; the opt-out and a pending deletion; and how to use both.

The page fetches nothing and runs nothing: inline CSS only, and a Content-Security-Policy that forbids
every network load and every script, so even a string that escaped its escaping could not act. Every
string shown is escaped (category names come from a file, ids and codes from a database).
"""

from __future__ import annotations

import datetime as dt
import html
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sotto.edge.client import _DELETE_PENDING, _OPTED_OUT  # the client owns these state keys
from sotto.edge.outbox import LedgerEntry, Outbox, OutboxStats
from sotto.edge.privacy import DROP_REASONS
from sotto.policy import Taxonomy

#: State key of the minor mark (``Device.set_minor``).
MINOR_STATE_KEY = "minor"

#: What each drop reason means, in the wearer's words (``DROP_REASONS`` order).
DROP_REASON_TEXT = {
    "sensitive": "it touched a sensitive subject (health, religion, politics, sexuality, money trouble, …)",
    "region": "profiling is not allowed in your region",
    "opt_out": "you had opted out, so the glasses did not even listen",
    "minor": "the wearer is marked as a minor",
    "no_speech": "no speech was recognised",
    "no_interest": "nothing in it was about a product or service",
    "too_long": "it was longer than 30 seconds: a recording, not a question, so it was not even transcribed",
}

#: Ways a signal left the outbox without reaching the aggregator (outbox counter, wearer's words).
_NOT_DELIVERED = (
    ("signals_purged", "erased by your opt-out or deletion before they were sent"),
    ("signals_set_aside", "refused by the aggregator and kept on the glasses, never resent"),
    ("signals_dropped_overflow", "dropped because too many waited while the glasses were offline"),
    ("signals_dropped_age", "dropped because they waited too long to be sent"),
)

_CSS = """
:root { color-scheme: light; }
body { font: 16px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; padding: 12px;
  background: #f6f6f3; color: #1d1d1b; }
main { max-width: 44rem; margin: 0 auto; }
h1 { font-size: 1.45rem; margin: .3rem 0 .2rem; }
h2 { font-size: 1.1rem; margin: 1.4rem 0 .4rem; border-bottom: 1px solid #d5d5cf; padding-bottom: .2rem; }
p { margin: .4rem 0; }
.lead { color: #4a4a45; }
.state { display: flex; flex-wrap: wrap; gap: .4rem; margin: .6rem 0; }
.pill { border-radius: 1rem; padding: .15rem .7rem; font-size: .9rem; background: #e3e3dc; }
.on { background: #ffe1c2; } .ok { background: #d7efd9; }
table { width: 100%; border-collapse: collapse; font-size: .92rem; background: #fff; }
th, td { text-align: left; padding: .35rem .4rem; border-bottom: 1px solid #ebebe6; vertical-align: top; }
th { font-weight: 600; background: #efefea; }
h3 { font-size: .98rem; margin: 1rem 0 .3rem; }
th.n { text-align: right; }
td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.tier { color: #6b6b64; font-size: .82rem; }
.noised { color: #8a4b00; } .asheard { color: #1d5e2a; }
.empty { color: #6b6b64; font-style: italic; }
ol li, ul li { margin: .3rem 0; }
code { font-size: .85em; background: #ecece6; padding: 0 .2rem; border-radius: .2rem; word-break: break-all; }
footer { margin-top: 1.6rem; font-size: .8rem; color: #6b6b64; }
"""


def _e(value: object) -> str:
    """Escape for HTML text and attribute values (quotes included)."""
    return html.escape(str(value), quote=True)


@dataclass(frozen=True, slots=True)
class WearerState:
    """The wearer's switches as the outbox remembers them."""

    opted_out: bool
    deletion_pending: bool
    minor: bool

    @classmethod
    def of(cls, outbox: Outbox) -> WearerState:
        """Read the switches from ``outbox``'s state."""
        return cls(
            opted_out=outbox.get_state(_OPTED_OUT) is not None,
            deletion_pending=outbox.get_state(_DELETE_PENDING) is not None,
            minor=outbox.get_state(MINOR_STATE_KEY) is not None,
        )


def _how_sent(entry: LedgerEntry) -> tuple[str, str]:
    """(CSS class, text) for one ledger entry's noise."""
    if entry.epsilon is None:
        return "", "not recorded"
    if entry.epsilon > 0:
        return "noised", f"noised, ε\u00a0=\u00a0{entry.epsilon:g}"  # kept on one line
    return "asheard", "as heard"


def _day(entry: LedgerEntry) -> str:
    """A day as people write it ("2 Dec 2026")."""
    return f"{entry.date.day} {entry.date:%b %Y}"


def _sent_tables(entries: list[LedgerEntry], taxonomy: Taxonomy) -> str:
    """One small table per day, newest first: category, signals, how they were sent (phone-width)."""
    groups: Counter[tuple[int, str, float | None]] = Counter(
        (e.day, e.category_id, e.epsilon) for e in entries
    )
    weights: dict[tuple[int, str, float | None], float] = {}
    samples: dict[tuple[int, str, float | None], LedgerEntry] = {}
    for e in entries:
        key = (e.day, e.category_id, e.epsilon)
        weights[key] = max(weights.get(key, 0.0), e.weight)
        samples.setdefault(key, e)
    out = []
    for day in sorted({k[0] for k in groups}, reverse=True):
        keys = sorted((k for k in groups if k[0] == day), key=lambda k: (k[1], k[2] or 0.0))
        rows = []
        for key in keys:
            sample = samples[key]
            css, how = _how_sent(sample)
            category_id = key[1]
            category = taxonomy[category_id] if category_id in taxonomy else None  # noqa: SIM401 (no .get)
            name = category.name if category is not None else f"unknown category {category_id}"
            where = f"{category.tier1} · IAB {category_id} · " if category is not None else ""
            rows.append(
                f'<tr><td>{_e(name)}<div class="tier">{_e(where)}weight {weights[key]:.2f}</div></td>'
                f'<td class="n">{groups[key]}</td><td class="{css}">{_e(how)}</td></tr>'
            )
        out.append(
            f"<h3>{_e(_day(samples[keys[0]]))}</h3><table><thead><tr><th>Category</th>"
            '<th class="n">Signals</th><th>Sent</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>"
        )
    return "\n".join(out)


def render_page(
    outbox: Outbox,
    taxonomy: Taxonomy,
    *,
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> str:
    """The wearer's page for ``outbox`` as one HTML document (UTF-8 text, self-contained)."""
    entries = outbox.ledger()
    stats = outbox.stats()
    state = WearerState.of(outbox)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # Nothing may load or run: no network, no script, only the inline style below and data: images.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:; form-action 'none'; base-uri 'none'\">",
        "<title>What your glasses sent</title>",
        f"<style>{_CSS}</style></head><body><main>",
        "<h1>What your glasses sent</h1>",
        '<p class="lead">Your glasses turn what you say into a few coarse interest categories. Your voice, '
        "the words and anything sensitive never leave them. This page lists everything that did leave, "
        "as your glasses recorded it when the service confirmed it.</p>",
        _state_section(state),
        _sent_section(entries, taxonomy),
        _withheld_section(stats),
        _never_left_section(stats),
        _controls_section(),
        f"<footer>Written by your glasses on {_e(now().strftime('%Y-%m-%d %H:%M UTC'))}. Days are UTC days. "
        f"{stats.ledger_entries} sent signals are remembered (the record keeps "
        f"{outbox.limits.ledger_max_age_days:g} days).</footer>",
        "</main></body></html>",
    ]
    return "\n".join(parts) + "\n"


def _state_section(state: WearerState) -> str:
    pills = [
        '<span class="pill on">Interest signals: off (you opted out)</span>'
        if state.opted_out
        else '<span class="pill ok">Interest signals: on</span>'
    ]
    if state.deletion_pending:
        pills.append('<span class="pill on">Deletion requested, not yet confirmed</span>')
    if state.minor:
        pills.append('<span class="pill on">Marked as a minor: no profiling</span>')
    text = ""
    if state.deletion_pending:
        text = (
            "<p>You asked for your profile to be deleted. Your glasses have already erased everything they "
            "held; they will keep asking the service to delete your profile each time they connect, and "
            "send nothing meanwhile.</p>"
        )
    return '<section><div class="state">' + "".join(pills) + "</div>" + text + "</section>"


def _sent_section(entries: list[LedgerEntry], taxonomy: Taxonomy) -> str:
    head = "<section><h2>What left your glasses</h2>"
    if not entries:
        return head + '<p class="empty">Nothing has been sent from these glasses.</p></section>'
    noised = sum(1 for e in entries if e.noised)
    epsilons = sorted({e.epsilon for e in entries if e.epsilon})
    note = ""
    if noised:
        eps = ", ".join(f"{x:g}" for x in epsilons)
        note = (
            f"<p>{noised} of these {len(entries)} signals were <b>noised</b> (ε = {_e(eps)}): before it "
            "left, each signal's category was kept only with a set probability and otherwise replaced "
            "by one picked at random, so a noised category may be one you never talked about. That is "
            "on purpose: nobody, not even the service, can tell which ones are real. A smaller ε means "
            "more noise and more privacy.</p>"
        )
    table = _sent_tables(entries, taxonomy)
    return (
        head + f"<p>{len(entries)} signals, newest day first. The weight (0 to 1) says how strong the "
        "interest seemed; only four levels exist.</p>" + note + table + "</section>"
    )


def _withheld_section(stats: OutboxStats) -> str:
    withheld = stats.get("signals_withheld_budget")
    waiting = stats.queued_signals
    return (
        "<section><h2>Held back and waiting</h2><table><tbody>"
        f'<tr><td>Withheld by the daily privacy budget (never sent)</td><td class="n">{withheld}</td></tr>'
        f'<tr><td>Waiting on the glasses to be sent</td><td class="n">{waiting}</td></tr>'
        "</tbody></table><p>The privacy budget caps how many signals may leave per day; past it, "
        "signals are simply not sent.</p></section>"
    )


def _never_left_section(stats: OutboxStats) -> str:
    heard = stats.get("utterances_heard")
    kept = stats.get("utterances_kept")
    rows = [
        f'<tr><td>{_e(DROP_REASON_TEXT[reason])}</td><td class="n">'
        f"{stats.get(f'utterances_dropped_{reason}')}</td></tr>"
        for reason in DROP_REASONS
    ]
    lost = [
        f'<tr><td>{_e(text)}</td><td class="n">{stats.get(name)}</td></tr>' for name, text in _NOT_DELIVERED
    ]
    return (
        "<section><h2>What never left</h2>"
        f"<p>Your glasses heard {heard} requests; {kept} of them produced an interest signal. The others "
        "produced nothing that could leave, because:</p>"
        "<table><thead><tr><th>Reason</th><th>Requests</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table><p>Only these counts are kept: never what was said, and never which sensitive "
        "subject it was.</p><table><thead><tr><th>Signals that were not delivered</th><th>Signals</th></tr>"
        "</thead><tbody>" + "".join(lost) + "</tbody></table></section>"
    )


def _controls_section() -> str:
    return (
        "<section><h2>Your controls</h2><ul>"
        "<li><b>Opt out.</b> Turn off <i>Interest signals</i> in the app. Your glasses stop listening for "
        "interests at once, erase every signal still waiting, and send nothing until you turn it back on. "
        "The choice is remembered when the glasses restart.</li>"
        "<li><b>Delete your profile.</b> Choose <i>Delete my profile</i> in the app. Your glasses erase "
        "what they hold and this record, then ask the service to erase your profile; if they are offline "
        "they keep asking until it is done. A new profile starts only if you set the glasses up again.</li>"
        "<li><b>Forget this record.</b> <i>Clear history</i> erases this list from your glasses only; what "
        "was sent stays with the service until it expires or you delete your profile.</li>"
        "</ul><p>For app developers: <code>Device.set_opt_out(True)</code>, "
        "<code>Device.delete_profile()</code>, <code>sotto-edge ledger --clear</code>.</p></section>"
    )


def write_page(outbox: Outbox, taxonomy: Taxonomy, path: str | os.PathLike[str]) -> Path:
    """Write :func:`render_page` to ``path`` (UTF-8), atomically: a reader never sees half a page."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{target}: is a folder; give the path of an HTML file")
    page = render_page(outbox, taxonomy)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, target)
    return target
