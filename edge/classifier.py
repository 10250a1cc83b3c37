"""Interest and sensitivity classifier: one small model file run by ONNX Runtime.

The model (``models/classifier.onnx``, built by ``tools/build_models.py``) is a MiniLM sentence encoder
quantized to int8 with two heads on its pooled embedding: interest categories (IAB 3.1, plus "none")
and sensitivity classes (plus "none"). Its metadata, label order and thresholds live in
``models/classifier.json`` so that firmware never hard-codes them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.asr import ModelError, sha256_file
from edge.policy import models_dir

NONE_LABEL = "none"
BACKENDS = ("onnx",)

_PUNCT = re.compile(r"[^\w\s']+")
_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """The text form the model was trained on: lowercase words, no punctuation.

    ASR output ("I need new running shoes.") and typed queries ("need new running shoes") must look
    the same to the model; training and the device both call this.
    """
    return _SPACE.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


@dataclass(frozen=True, slots=True)
class ClassifierOutput:
    """Probabilities for one text."""

    #: Interest category ids with their probabilities, best first ("none" excluded).
    interests: list[tuple[str, float]]
    #: Probability that the text has no commercial interest.
    no_interest: float
    #: Probability that the text touches any sensitive class (1 - P(none)).
    sensitive: float
    #: Most likely sensitive class, whatever its probability.
    sensitive_class: str


@dataclass(frozen=True, slots=True)
class ClassifierMeta:
    interest_labels: list[str]
    sensitive_labels: list[str]
    sensitive_threshold: float
    max_tokens: int
    files: dict[str, str]
    sha256: dict[str, str]

    @classmethod
    def load(cls, path: Path) -> ClassifierMeta:
        try:
            raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                interest_labels=list(raw["interest_labels"]),
                sensitive_labels=list(raw["sensitive_labels"]),
                sensitive_threshold=float(raw["sensitive_threshold"]),
                max_tokens=int(raw["max_tokens"]),
                files=dict(raw["files"]),
                sha256=dict(raw["sha256"]),
            )
        except FileNotFoundError:
            raise ModelError(
                f"{path}: classifier metadata not found; run python tools/build_models.py"
            ) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{path}: malformed classifier metadata ({exc})") from None


def outputs_from_probabilities(
    meta: ClassifierMeta, interest: np.ndarray, sensitive: np.ndarray
) -> list[ClassifierOutput]:
    """Turn the model's two probability matrices into one ClassifierOutput per row."""
    none_interest = meta.interest_labels.index(NONE_LABEL)
    none_sensitive = meta.sensitive_labels.index(NONE_LABEL)
    out = []
    for p_int, p_sen in zip(interest, sensitive, strict=True):
        ranked = [
            (meta.interest_labels[i], float(p_int[i])) for i in np.argsort(-p_int) if i != none_interest
        ]
        sen_classes = [i for i in np.argsort(-p_sen) if i != none_sensitive]
        out.append(
            ClassifierOutput(
                interests=ranked,
                no_interest=float(p_int[none_interest]),
                sensitive=float(1.0 - p_sen[none_sensitive]),
                sensitive_class=meta.sensitive_labels[sen_classes[0]],
            )
        )
    return out


class TextClassifier:
    """Runs the shipped classifier on normalized text."""

    def __init__(self, folder: str | Path | None = None, backend: str = "onnx", threads: int = 1) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown classifier backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        root = models_dir(folder)
        self.meta = ClassifierMeta.load(root / "classifier.json")
        paths = {key: root / name for key, name in self.meta.files.items()}
        for key in ("onnx", "tokenizer"):
            if key not in paths:
                raise ModelError(f"{root / 'classifier.json'}: no '{key}' file listed")
            expected = self.meta.sha256.get(key)
            if not paths[key].is_file():
                raise ModelError(f"{paths[key]}: model file not found")
            if expected and sha256_file(paths[key]) != expected:
                raise ModelError(f"{paths[key]}: SHA-256 does not match classifier.json; refusing to load it")

        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(paths["tokenizer"]))
        # The tokenizer file may carry fixed-length padding (MiniLM's pads to 128): every query would then
        # cost 128 positions, and padding shifts the int8 model's activation scales. Real length only.
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(self.meta.max_tokens)

        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(str(paths["onnx"]), opts, providers=["CPUExecutionProvider"])

    def probabilities(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Raw (interest, sensitivity) probability matrices for already normalized texts.

        Each text runs alone: the int8 model quantizes activations with one scale per tensor, so padding
        and neighbours in a batch would shift a text's scores. The device classifies one utterance at a
        time, and the sensitivity threshold was calibrated the same way.
        """
        interest, sensitive = [], []
        for text in texts:
            enc = self._tokenizer.encode(text)
            feeds = {
                "input_ids": np.array([enc.ids], dtype=np.int64),
                "attention_mask": np.array([enc.attention_mask], dtype=np.int64),
            }
            p_int, p_sen = self._session.run(None, feeds)
            interest.append(p_int[0])
            sensitive.append(p_sen[0])
        return np.stack(interest), np.stack(sensitive)

    def classify_batch(self, texts: list[str]) -> list[ClassifierOutput]:
        normalized = [normalize_text(t) or "." for t in texts]
        interest, sensitive = self.probabilities(normalized)
        return outputs_from_probabilities(self.meta, interest, sensitive)

    def classify(self, text: str) -> ClassifierOutput:
        return self.classify_batch([text])[0]
