"""One pair of glasses: the pipeline, local differential privacy and delivery, wired once, with one
persisted state.

Firmware builds a :class:`Device` at boot and feeds it the microphone's frames as they arrive
(:meth:`Device.listen`), or whole utterances when it has its own end-of-query signal (:meth:`Device.hear`):

    device = Device("profile-id-1234", "US", target="aggregator.example.com:50051", token=token,
                    outbox="/data/sotto/outbox.db", ldp=LdpOptions(epsilon=2.0, daily_budget=20))
    for result in device.listen(frame):  # an utterance's analysis once the speech gate closes it
        device.flush_if_due()            # after each utterance and from a timer: sends what is due

Everything the wearer decides and everything the privacy guarantees depend on (the opt-out, a pending
deletion, the minor mark, the daily privacy budget) lives in the outbox database, so it survives a
reboot and there is one switch for each: :meth:`Device.set_opt_out` stops the pipeline from listening
and the client from storing or sending, together. The lower-level classes (``Pipeline``,
``DeliveryClient``, ``LocalPrivacy``, ``Outbox``) stay public for those who need to wire them otherwise.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from types import TracebackType

import grpc

from sotto.edge.audio import Audio
from sotto.edge.client import (
    DeletionState,
    DeletionStatus,
    DeliveryClient,
    DeliveryOptions,
    TlsOptions,
    deletion_state,
)
from sotto.edge.ldp import LdpOptions, LocalPrivacy
from sotto.edge.outbox import LedgerEntry, Outbox, OutboxLimits
from sotto.edge.pipeline import Analysis, EdgeConfig, EdgeModels, Pipeline
from sotto.edge.stream import UtteranceStream
from sotto.edge.transparency import MINOR_STATE_KEY, write_page
from sotto.wire import canonical_region, check_profile_id

log = logging.getLogger(__name__)

#: State key of the minor mark in the outbox.
_MINOR = MINOR_STATE_KEY


class Device:
    """A wearer's glasses: hears utterances, keeps what may leave in its outbox, sends it when due.

    ``profile_id`` and ``region`` are checked before anything is opened or written (``ValueError``).
    ``outbox`` is the database path (None: in memory, nothing survives the process). Give ``target``
    (the aggregator's address; TLS with ``tls``) or an existing ``channel``, and the device's ``token``
    unless its TLS client certificate identifies it. ``models`` may be shared by several devices in one
    process (an emulator does); by default the device loads its own with ``config``. ``ldp`` turns on
    local differential privacy (the daily budget and randomized response) for everything that leaves.
    """

    def __init__(
        self,
        profile_id: str,
        region: str,
        *,
        outbox: str | os.PathLike[str] | None,
        target: str | None = None,
        channel: grpc.Channel | None = None,
        token: str | None = None,
        tls: TlsOptions | None = None,
        models: EdgeModels | None = None,
        config: EdgeConfig | None = None,
        ldp: LdpOptions | None = None,
        delivery: DeliveryOptions | None = None,
        limits: OutboxLimits | None = None,
    ) -> None:
        self.profile_id = check_profile_id(profile_id)
        self.region = canonical_region(region)
        if (target is None) == (channel is None):
            raise ValueError("give exactly one of target or channel")
        if models is not None and config is not None:
            raise ValueError("give models or config, not both: shared models carry their own config")
        if token is None and (tls is None or tls.certificate_chain is None):
            # Not an error (a channel may carry credentials of its own), but without one the aggregator
            # refuses every batch as UNAUTHENTICATED and the device sets each aside.
            log.warning(
                "device %s has no token and no TLS client certificate: the aggregator will refuse its "
                "batches unless the channel authenticates it",
                "…" + self.profile_id[-4:],
            )
        self.models = models if models is not None else EdgeModels(config)
        options = delivery or DeliveryOptions()
        self.outbox = Outbox(outbox, limits)
        try:
            self.client = DeliveryClient(
                self.profile_id,
                self.region,
                target=target,
                channel=channel,
                token=token,
                tls=tls,
                outbox=self.outbox,
                **asdict(options),
            )
        except BaseException:
            self.outbox.close()
            raise
        self.privacy = (
            None if ldp is None else LocalPrivacy(self.models.policy.interest_ids, ldp, budget=self.outbox)
        )
        self.pipeline = Pipeline(
            self.models,
            region=self.region,
            opted_out=self.client.opted_out,
            minor=self.minor,
            ldp=self.privacy,
        )
        self._stream: UtteranceStream | None = None  # the live microphone stream, from the first frame

    # --- hearing -------------------------------------------------------------------------------------

    def hear(self, audio: Audio, label: str = "<pcm>") -> Analysis:
        """Analyse one utterance of 16 kHz mono audio (``PcmStream.finish()`` or ``load_audio``) and store
        what may leave in the outbox (on disk when this returns). Sending is :meth:`flush_if_due`'s job,
        so that firmware decides when the radio is used."""
        return self._keep(self.pipeline.analyze_audio(audio, label=label))

    def listen(self, frame: bytes | bytearray | memoryview) -> list[Analysis]:
        """Take one frame of the live microphone stream (16 kHz mono int16, any size, from the audio
        callback); return the analyses of the utterances it completed, usually none. An utterance is
        analysed as soon as the speech gate sees the wearer stop (``UtteranceStream``) and what may leave
        is stored as by :meth:`hear`. While the wearer is opted out frames are dropped unread."""
        if self._stream is None:
            self._stream = UtteranceStream(self.pipeline)
        return [self._keep(result) for result in self._stream.push(frame)]

    def stop_listening(self) -> Analysis | None:
        """End the live stream (glasses taken off, button released): analyse the speech still buffered,
        if any, and store what may leave. The next :meth:`listen` starts a new stream."""
        if self._stream is None:
            return None
        stream, self._stream = self._stream, None
        with stream:
            result = stream.flush()
        return None if result is None else self._keep(result)

    def hear_file(self, path: str | os.PathLike[str]) -> Analysis:
        """:meth:`hear` for an audio file (WAV, FLAC, ...)."""
        return self._keep(self.pipeline.analyze_file(path))

    def hear_text(self, text: str) -> Analysis:
        """:meth:`hear` for a transcript or typed query (no audio stage)."""
        return self._keep(self.pipeline.analyze_text(text))

    def _keep(self, result: Analysis) -> Analysis:
        if result.outgoing:
            self.client.add(result.outgoing)
        # What never left, counted for the wearer's page: the reason only, never the text or the class.
        self.outbox.count_heard(None if result.dropped is None else result.dropped.reason, result.withheld)
        return result

    # --- the wearer's controls -----------------------------------------------------------------------

    @property
    def opted_out(self) -> bool:
        return self.client.opted_out

    def set_opt_out(self, opted_out: bool) -> int:
        """The wearer's opt-out switch, remembered across reboots: while on, utterances are not even
        transcribed and nothing is stored or sent; switching it on erases what was queued. Returns the
        number of signals erased."""
        erased = self.client.set_opt_out(opted_out)
        self.pipeline.set_opt_out(opted_out)
        return erased

    @property
    def minor(self) -> bool:
        return self.outbox.get_state(_MINOR) is not None

    def set_minor(self, minor: bool) -> int:
        """Mark the wearer as a minor (or not), remembered across reboots. Where the region table forbids
        profiling minors (everywhere as shipped), marking erases what was queued; returns how many
        signals were erased."""
        self.outbox.set_state(_MINOR, "1" if minor else None)
        self.pipeline.set_minor(minor)
        if minor and self.models.policy.regions.minors_blocked(self.region) is not None:
            return self.outbox.purge()
        return 0

    @property
    def deletion_pending(self) -> bool:
        return self.client.deletion_pending

    def delete_profile(self) -> DeletionStatus:
        """The wearer's deletion request (see ``DeliveryClient.delete_profile``): erases the outbox and
        the ledger at once and asks the aggregator to erase the profile, retrying on later flushes until
        the aggregator confirms it; returns where it stands."""
        return self.client.delete_profile()

    def deletion(self) -> DeletionState | None:
        """Where the wearer's deletion request stands (None: there was none)."""
        return deletion_state(self.outbox)

    # --- delivery and transparency -------------------------------------------------------------------

    def flush_if_due(self) -> bool | None:
        """Send when a full batch (or a deletion) waits or the oldest signal has waited long enough; cheap
        otherwise. Call it after each utterance and from a timer."""
        return self.client.flush_if_due()

    def flush(self) -> bool:
        """Send everything queued now; True when nothing is left pending."""
        return self.client.flush()

    def ledger(self) -> list[LedgerEntry]:
        """Every signal the aggregator acknowledged, oldest first: what this device has sent."""
        return self.outbox.ledger()

    def write_transparency_page(self, path: str | os.PathLike[str]) -> Path:
        """Write the wearer's page (``sotto.edge.transparency``) to ``path``: what left, what never left and
        why, the opt-out and a pending deletion, and how to use them. Returns the path written."""
        return write_page(self.outbox, self.models.policy.taxonomy, path)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()  # its worker thread; speech still buffered is not analysed
            self._stream = None
        self.client.close()
        self.outbox.close()

    def __enter__(self) -> Device:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
