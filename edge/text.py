"""Text as the classifier must see it: Unicode format characters resolved or removed before classifying.

A typed query (or a text file) can hide what it says from a classifier while showing it to a person:
text typed backwards inside a RIGHT-TO-LEFT OVERRIDE (U+202E) is displayed forwards; zero-width
characters split a word into pieces no tokenizer recognises; a LINE SEPARATOR (U+2028) or an information
separator (``\\x1c``) splits one query into two. :func:`readings` gives every way the text may be read
(what a person sees, and the characters in stored order when those differ), each normalised; the pipeline
classifies all of them and the most sensitive reading decides, so hiding fails closed.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["MAX_TEXT_CHARS", "normalize_text", "readings", "visual_order"]

#: Longer text is cut here before classifying (the classifier reads 128 tokens at most anyway); a query
#: is a sentence or two, and an unbounded string costs memory and time for nothing.
MAX_TEXT_CHARS = 2000

_LRE, _RLE, _PDF, _LRO, _RLO = "\u202a", "\u202b", "\u202c", "\u202d", "\u202e"
_LRI, _RLI, _FSI, _PDI = "\u2066", "\u2067", "\u2068", "\u2069"
_OPENERS = {_LRE, _RLE, _LRO, _RLO, _LRI, _RLI, _FSI}
_BIDI_CONTROLS = _OPENERS | {_PDF, _PDI}
_SPACES = re.compile(r"\s+")


def visual_order(text: str) -> str:
    """``text`` in the order a person sees it, for explicit directional overrides: what stands inside a
    RIGHT-TO-LEFT OVERRIDE is shown reversed (nested spans reversed as units). Other embeddings and
    isolates do not reorder Latin text and are dropped with every other control."""
    stack: list[tuple[str, list[str]]] = [("", [])]
    for char in text:
        if char in _OPENERS:
            stack.append((char, []))
        elif char in (_PDF, _PDI) or char in "\n\u2029":
            # A paragraph end closes every open span; PDF/PDI close the innermost one.
            closes = len(stack) - 1 if char not in (_PDF, _PDI) else min(1, len(stack) - 1)
            for _ in range(closes):
                _close(stack)
            if char not in (_PDF, _PDI):
                stack[-1][1].append(char)
        else:
            stack[-1][1].append(char)
    while len(stack) > 1:
        _close(stack)
    return "".join(stack[0][1])


def _close(stack: list[tuple[str, list[str]]]) -> None:
    opener, parts = stack.pop()
    shown = "".join(reversed(parts)) if opener == _RLO else "".join(parts)
    stack[-1][1].append(shown)


def normalize_text(text: str) -> str:
    """NFKC, every format character (Unicode category Cf: zero-width spaces and joiners, bidi controls,
    soft hyphens, tags...) removed, every line or paragraph separator and control character (Cc, Zl, Zp)
    made a space, runs of white space collapsed, cut to :data:`MAX_TEXT_CHARS`."""
    text = unicodedata.normalize("NFKC", text[: MAX_TEXT_CHARS * 4])
    out = []
    for char in text:
        category = unicodedata.category(char)
        if category == "Cf":
            continue
        out.append(" " if category in ("Cc", "Zl", "Zp") else char)
    return _SPACES.sub(" ", "".join(out)).strip()[:MAX_TEXT_CHARS]


def readings(text: str) -> list[str]:
    """The normalised ways ``text`` may be read: as displayed first, then in stored order when that
    differs (only when it holds directional controls)."""
    shown = normalize_text(visual_order(text))
    if not any(c in _BIDI_CONTROLS for c in text):
        return [shown]
    stored = normalize_text(text)
    return [shown] if stored == shown else [shown, stored]
