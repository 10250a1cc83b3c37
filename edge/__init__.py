"""Sotto on the device: voice query in, privacy-filtered interest signals out.

    from edge import EdgeModels, Pipeline
    models = EdgeModels()                      # loads the shipped classifier (ASR on first audio)
    device = Pipeline(models, region="US")
    result = device.analyze_text("where can i buy trail running shoes")
    result.signals   # [Interest(category_id='551', weight_level=3, day=20414)]

Names are imported lazily so that `import edge.policy` (used by the aggregator) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Analysis": "edge.pipeline",
    "EdgeConfig": "edge.pipeline",
    "EdgeModels": "edge.pipeline",
    "Pipeline": "edge.pipeline",
    "AsrOptions": "edge.asr",
    "SpeechGateOptions": "edge.vad",
    "FilterOptions": "edge.privacy",
    "Dropped": "edge.privacy",
    "Interest": "edge.privacy",
    "LdpOptions": "edge.ldp",
    "LocalPrivacy": "edge.ldp",
    "Audio": "edge.audio",
    "PcmStream": "edge.audio",
    "load_audio": "edge.audio",
    "encode_batch": "edge.signals",
    "DeliveryClient": "edge.client",
    "Outbox": "edge.outbox",
    "OutboxLimits": "edge.outbox",
    "TlsOptions": "edge.client",
    "Policy": "edge.policy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edge' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
