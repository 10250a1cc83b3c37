"""Sotto on the device: voice query in, privacy-filtered interest signals out.

    from sotto.edge import Device
    device = Device("profile-id-1234", "US", target="aggregator:50051", token=token, outbox="outbox.db")
    result = device.hear_text("where can i buy trail running shoes")   # or device.hear(audio)
    result.signals   # [Signal(category_id='551', weight_level=3, day=20414)]: stored, sent when due

``Device`` wires the lower-level parts (``EdgeModels``, ``Pipeline``, ``LocalPrivacy``,
``DeliveryClient``, ``Outbox``), which stay public.

Names are imported on first use, so that ``import sotto.edge.classifier`` alone (the TFLite fallback
environment has no gRPC) and the command line start light; type checkers see them all.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sotto.edge.asr import AsrOptions
    from sotto.edge.audio import Audio, PcmStream, load_audio
    from sotto.edge.client import DeletionStatus, DeliveryClient, DeliveryOptions, TlsOptions
    from sotto.edge.device import Device
    from sotto.edge.ldp import LdpOptions, LocalPrivacy
    from sotto.edge.outbox import Outbox, OutboxLimits
    from sotto.edge.pipeline import Analysis, EdgeConfig, EdgeModels, Pipeline
    from sotto.edge.privacy import Dropped, FilterOptions
    from sotto.edge.signals import encode_batch
    from sotto.edge.stream import UtteranceStream, analyze_pcm
    from sotto.edge.vad import SpeechGateOptions
    from sotto.policy import Policy
    from sotto.wire import Signal

_EXPORTS = {
    "Analysis": "sotto.edge.pipeline",
    "AsrOptions": "sotto.edge.asr",
    "Audio": "sotto.edge.audio",
    "DeletionStatus": "sotto.edge.client",
    "DeliveryClient": "sotto.edge.client",
    "DeliveryOptions": "sotto.edge.client",
    "Device": "sotto.edge.device",
    "Dropped": "sotto.edge.privacy",
    "EdgeConfig": "sotto.edge.pipeline",
    "EdgeModels": "sotto.edge.pipeline",
    "FilterOptions": "sotto.edge.privacy",
    "Signal": "sotto.wire",
    "LdpOptions": "sotto.edge.ldp",
    "LocalPrivacy": "sotto.edge.ldp",
    "Outbox": "sotto.edge.outbox",
    "OutboxLimits": "sotto.edge.outbox",
    "PcmStream": "sotto.edge.audio",
    "Pipeline": "sotto.edge.pipeline",
    "Policy": "sotto.policy",
    "SpeechGateOptions": "sotto.edge.vad",
    "TlsOptions": "sotto.edge.client",
    "UtteranceStream": "sotto.edge.stream",
    "analyze_pcm": "sotto.edge.stream",
    "encode_batch": "sotto.edge.signals",
    "load_audio": "sotto.edge.audio",
}

__all__ = [
    "Analysis",
    "AsrOptions",
    "Audio",
    "DeletionStatus",
    "DeliveryClient",
    "DeliveryOptions",
    "Device",
    "Dropped",
    "EdgeConfig",
    "EdgeModels",
    "FilterOptions",
    "Signal",
    "LdpOptions",
    "LocalPrivacy",
    "Outbox",
    "OutboxLimits",
    "PcmStream",
    "Pipeline",
    "Policy",
    "SpeechGateOptions",
    "TlsOptions",
    "UtteranceStream",
    "analyze_pcm",
    "encode_batch",
    "load_audio",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sotto.edge' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
