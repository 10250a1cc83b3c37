"""Where the repository's own files and the shared data sets are: the one place tools and tests ask.

The shared data (speech clips, query sets; see models/MODEL_CARD.md) lives beside the checkout in
``../shared/data``; ``$SOTTO_SHARED_DATA`` points elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The root of the checkout.
REPO = Path(__file__).resolve().parents[1]
#: The model folder of the checkout, build-only files (reference_outputs.npz) included.
SOURCE_MODELS = REPO / "models"
#: The shared, licensed data sets.
SHARED_DATA = Path(os.environ.get("SOTTO_SHARED_DATA") or REPO.parent / "shared" / "data")
#: Real recorded speech clips with their transcripts.
SPEECH = SHARED_DATA / "speech"


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child ``python -m tools.X`` started from any folder: ``tools`` is found in the
    checkout (it is not installed)."""
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env
