"""The privacy filter: the only way from the classifier to the outbox.

Order of checks, cheapest and strictest first: user opt-out, region policy, the minors rule (all
before any audio is processed), then, per utterance, the sensitivity detector, then the interest
threshold. A sensitive utterance yields no signal at all, not even for a benign part of it.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from sotto.edge.classifier import ClassifierMeta, ClassifierOutput
from sotto.edge.gazetteer import Gazetteer
from sotto.policy import Policy
from sotto.wire import MAX_WEIGHT_LEVEL, WEIGHT_LEVELS, Signal, day_number

DROP_REASONS = ("sensitive", "region", "opt_out", "minor", "no_speech", "no_interest", "too_long")


@dataclass(frozen=True, slots=True)
class FilterOptions:
    """Thresholds of the filter (the sensitivity threshold comes from the model's metadata)."""

    #: Override the model's commercial gate: an utterance is commercial only when P(no interest) is
    #: below it. The model's own gate (``max_no_interest`` in classifier.json) was chosen together with
    #: its sensitivity threshold; a looser one lets more missed sensitive queries through than the
    #: threshold was calibrated for.
    max_no_interest: float | None = None
    #: A category becomes a signal only with at least this share of the interest probability mass
    #: (related categories split the mass: "running shoes" is Sports Equipment and Fitness).
    min_share: float = 0.3
    #: At most this many signals per utterance, best first.
    max_signals: int = 2
    #: Override the model's recall-first sensitivity threshold (lower = stricter).
    sensitive_threshold: float | None = None
    #: Also drop an utterance as sensitive when it names a term of the reviewed gazetteer
    #: (models/gazetteer/), whatever the model says: a second recall path for knowledge the model lacks.
    gazetteer: bool = True


@dataclass(frozen=True, slots=True)
class Dropped:
    """Why an utterance produced no signal."""

    reason: str
    detail: str | None = None


def weight_level(probability: float) -> int:
    """Quantize a probability into one of the coarse WEIGHT_LEVELS (1..4)."""
    return max(WEIGHT_LEVELS[0], min(MAX_WEIGHT_LEVEL, math.ceil(probability * MAX_WEIGHT_LEVEL)))


class PrivacyFilter:
    """Applies the device policy to classifier outputs."""

    def __init__(
        self,
        policy: Policy,
        sensitive_threshold: float,
        options: FilterOptions | None = None,
        gazetteer: Gazetteer | None = None,
        *,
        max_no_interest: float,
    ) -> None:
        self.policy = policy
        self.options = options or FilterOptions()
        #: Consulted only when ``options.gazetteer`` is on.
        self.gazetteer = gazetteer if self.options.gazetteer else None
        self.sensitive_threshold = (
            self.options.sensitive_threshold
            if self.options.sensitive_threshold is not None
            else sensitive_threshold
        )
        if not 0.0 < self.sensitive_threshold <= 1.0:
            raise ValueError(f"sensitive threshold must be in (0, 1], got {self.sensitive_threshold}")
        #: The commercial gate: the model's (``max_no_interest``) unless the options override it.
        self.max_no_interest = (
            self.options.max_no_interest if self.options.max_no_interest is not None else max_no_interest
        )
        if not 0.0 < self.max_no_interest <= 1.0:
            raise ValueError(f"max_no_interest must be in (0, 1], got {self.max_no_interest}")
        self.opted_out = False
        self.minor = False

    @classmethod
    def for_model(
        cls,
        policy: Policy,
        meta: ClassifierMeta,
        options: FilterOptions | None = None,
        gazetteer: Gazetteer | None = None,
    ) -> PrivacyFilter:
        """The filter at the operating point the model was calibrated for: its sensitivity threshold and
        its commercial gate together, from classifier.json (``options`` may still override either)."""
        return cls(
            policy,
            meta.sensitive_threshold,
            options,
            gazetteer,
            max_no_interest=meta.max_no_interest,
        )

    def set_opt_out(self, opted_out: bool) -> None:
        """The wearer's switch: while set, no utterance yields a signal."""
        self.opted_out = opted_out

    def set_minor(self, minor: bool) -> None:
        """The device setting that says the wearer is a minor; whether that stops signals is the region
        table's ``no_minors`` rule (data, not code)."""
        self.minor = minor

    def gate(self, region: str, today: dt.date) -> Dropped | None:
        """Checks that do not depend on what was said; a result means: do not even listen."""
        if self.opted_out:
            return Dropped("opt_out", "the wearer opted out of interest signals")
        rule = self.policy.regions.blocked(region, today)
        if rule is not None:
            return Dropped("region", f"no profiling in {rule.region} ({rule.note})")
        if self.minor:
            rule = self.policy.regions.minors_blocked(region, today)
            if rule is not None:
                return Dropped("minor", f"the wearer is marked as a minor ({rule.note})")
        return None

    def select_interests(self, output: ClassifierOutput, day: int) -> list[Signal]:
        """The signals an utterance yields if it is not sensitive: none unless it is commercial, then the
        leading categories, weighted by their share of the interest probability mass."""
        if output.no_interest >= self.max_no_interest:
            return []
        mass = 1.0 - output.no_interest
        signals: list[Signal] = []
        for cid, prob in output.interests:
            share = prob / mass
            if share < self.options.min_share or len(signals) >= self.options.max_signals:
                break
            # Belt and braces: the model's label set is checked at build time, and checked again here.
            if cid not in self.policy.interest_ids or cid in self.policy.sensitive:
                continue
            signals.append(Signal(cid, weight_level(share), day))
        return signals

    def decide(
        self, output: ClassifierOutput, today: dt.date, text: str | None = None
    ) -> list[Signal] | Dropped:
        """Signals for one classified utterance, or why there are none. ``text`` is the transcript the
        output came from; the gazetteer needs it (and refuses to decide without it)."""
        if output.sensitive >= self.sensitive_threshold:
            return Dropped("sensitive", output.sensitive_class)
        if self.gazetteer is not None:
            if text is None:  # fail closed: a caller that forgot the text must not skip the check
                raise ValueError("the gazetteer is on: decide() needs the utterance's text")
            hit = self.gazetteer.match(text)
            if hit is not None:
                return Dropped("sensitive", hit.sensitive_class)
        return self.select_interests(output, day_number(today)) or Dropped("no_interest", None)
