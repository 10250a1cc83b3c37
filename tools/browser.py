"""Open a local HTML file in headless Chromium: its DOM after rendering, its visible text, a screenshot.

Used by the tests of the pages Sotto writes (the wearer's page, the emulator's report), so that what is
checked is what a browser shows, not what a string contains. Chromium runs with a fresh profile, no
network services of its own and no sandbox (tests run as root in CI, where the sandbox cannot start).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

#: Flags for a quiet, isolated, headless Chromium that fetches nothing on its own.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    # Containers often give /dev/shm only 64 MiB, where Chromium's renderer crashes; use /tmp instead.
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)
_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


class BrowserError(RuntimeError):
    """Chromium is missing or failed."""


def chromium() -> str:
    """Path of the Chromium executable; ``BrowserError`` naming the package when there is none."""
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    raise BrowserError(
        "Chromium is not installed: apt-get install chromium (tools/bootstrap.sh does, as root)"
    )


def _run(page: Path, *flags: str, timeout_s: float = 120.0) -> bytes:
    with tempfile.TemporaryDirectory(prefix="sotto-chromium-") as profile:
        cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *flags, page.resolve().as_uri()]
        try:
            done = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False, cwd=profile)
        except subprocess.TimeoutExpired as exc:
            raise BrowserError(f"chromium did not finish within {timeout_s:g} s") from exc
    if done.returncode != 0:
        stderr = done.stderr.decode(errors="replace")[-2000:]
        raise BrowserError(f"chromium exited {done.returncode}: {stderr}")
    return done.stdout


def dump_dom(page: Path) -> str:
    """The document as Chromium serializes it after parsing and rendering ``page``."""
    return _run(page, "--dump-dom").decode("utf-8")


def screenshot(page: Path, out: Path, width: int = 412, height: int = 1200) -> tuple[int, int]:
    """A PNG of ``page`` in a ``width`` x ``height`` window (default: a phone) at ``out``; returns the
    PNG's size as read from its header."""
    _run(page, f"--screenshot={out.resolve()}", f"--window-size={width},{height}")
    return png_size(out)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR; ``BrowserError`` when the file is not a PNG."""
    data = path.read_bytes()[:24]
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise BrowserError(f"{path}: not a PNG file")
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


class RenderedDom(HTMLParser):
    """The visible text and the element names of a serialized DOM (style and head contents left out)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str | None]] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes.extend(attrs)
        if tag in ("style", "script", "title", "head"):
            self._hidden += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "script", "title", "head"):
            self._hidden -= 1

    def handle_data(self, data: str) -> None:
        if not self._hidden and data.strip():
            self.text.append(" ".join(data.split()))

    @classmethod
    def parse(cls, dom: str) -> RenderedDom:
        """Parse Chromium's ``--dump-dom`` output."""
        parsed = cls()
        parsed.feed(dom)
        parsed.close()
        return parsed

    @property
    def visible_text(self) -> str:
        """The text a reader sees, whitespace collapsed, pieces joined by single spaces."""
        return " ".join(self.text)
