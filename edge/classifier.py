"""Interest and sensitivity classifier: one small model, run by ONNX Runtime or by a TFLite runtime.

The model (built by ``tools/build_models.py``) is a MiniLM sentence encoder with two heads on its
pooled embedding: interest categories (IAB 3.1, plus "none") and sensitivity classes (plus "none").
It ships twice with the same int8 weights (one symmetric scale per output channel, float32 compute):
``models/classifier.onnx`` for ONNX Runtime and ``models/classifier.tflite`` for ai-edge-litert (or
tflite-runtime, its predecessor, where no ai-edge-litert wheel exists). A device needs only one of the
two; ``backend`` picks it. Metadata, label order and thresholds live in ``models/classifier.json`` so
that firmware never hard-codes them.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sotto.edge.asr import ModelError, sha256_file
from sotto.policy import models_dir

NONE_LABEL = "none"
#: The commercial gate of a model whose metadata states none: models calibrated before the gate was
#: part of calibration were calibrated at this value.
DEFAULT_MAX_NO_INTEREST = 0.5
#: Classifier runtimes: the key of each in classifier.json's "files".
BACKENDS = ("onnx", "tflite")
#: TFLite tensor names, as tools/tflite_export.py writes them, in one signature per input length.
TFLITE_INPUTS = ("input_ids", "attention_mask")
TFLITE_OUTPUTS = ("interest_probs", "sensitive_probs")
_TFLITE_SIGNATURE = re.compile(r"tokens_(\d+)")


def tflite_signature(length: int) -> str:
    """Name of the TFLite signature that takes ``[1, length]`` tokens."""
    return f"tokens_{length}"


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
    #: The commercial gate chosen with the threshold: P(no interest) below it makes a query commercial.
    max_no_interest: float = DEFAULT_MAX_NO_INTEREST

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
                max_no_interest=_unit_interval(
                    "max_no_interest", raw.get("max_no_interest", DEFAULT_MAX_NO_INTEREST)
                ),
            )
        except FileNotFoundError:
            raise ModelError(
                f"{path}: classifier metadata not found; run python -m tools.build_models"
            ) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{path}: malformed classifier metadata ({exc})") from None


def _unit_interval(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


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


def onnx_session(path: str | Path, threads: int = 1) -> Any:
    """An ONNX Runtime session for the classifier file, configured as the device runs it.

    The file stores its weights as int8 behind DequantizeLinear nodes. ``session.disable_quant_qdq``
    lets ONNX Runtime fold those into float32 weights once, at load, so every query runs float matmuls
    on exactly the rounded weights (the function the TFLite file computes too), instead of ONNX Runtime
    rewriting the graph into its own int8 kernels, whose results differ from the TFLite runtime's.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
        raise ModelError(f"{path}: ONNX Runtime cannot load this model ({exc})") from None


def tflite_interpreter_class() -> Any:
    """The TFLite ``Interpreter`` class: ai-edge-litert's, else tflite-runtime's; ModelError if neither
    is installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise ModelError(
                "the tflite classifier backend needs a TFLite runtime: pip install 'sotto[tflite]' "
                "(ai-edge-litert; or tflite-runtime where no ai-edge-litert wheel exists)"
            ) from None
    return Interpreter


def tflite_interpreter(path: str | Path, threads: int = 1) -> Any:
    """A ready TFLite ``Interpreter`` for ``path``: ai-edge-litert, else tflite-runtime.

    tflite-runtime (last release 2.14, 2023) is the fallback for devices without an ai-edge-litert
    wheel. The shipped file keeps to ops it has (no bool GATHER_ND) and holds weight-only int8, which it
    computes correctly. It would compute *dynamic-range* int8 files wrongly without any error (its
    hybrid kernels misread per-channel scales), so such a file is refused on it.
    """
    Interpreter = tflite_interpreter_class()
    try:
        interpreter = Interpreter(model_path=str(path), num_threads=threads)
    except (ValueError, RuntimeError, SystemError) as exc:
        raise ModelError(f"{path}: the TFLite runtime cannot load this model ({exc})") from None
    if Interpreter.__module__.startswith("tflite_runtime") and _hybrid_ops(interpreter):
        raise ModelError(
            f"{path}: dynamic-range int8 model; tflite-runtime 2.14 computes it wrongly. "
            "Use ai-edge-litert, or a weight-only int8 file."
        )
    interpreter.allocate_tensors()
    return interpreter


def _hybrid_ops(interpreter: Any) -> set[str]:
    """Ops that read int8 tensors and write float ones (dynamic-range "hybrid" ops). DEQUANTIZE and CAST
    are exact conversions (the embedding tables' int8 rows are gathered, then cast and scaled), not
    hybrid arithmetic."""
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    try:
        ops = interpreter._get_ops_details()  # private, but present in tflite-runtime 2.5 .. 2.14
    except AttributeError:
        return {"int8"} if any(t["dtype"] == np.int8 for t in tensors.values()) else set()
    found = set()
    for op in ops:
        if op["op_name"] in ("DEQUANTIZE", "CAST"):  # exact conversions, not int8 arithmetic
            continue
        ins = [tensors[i]["dtype"] for i in op["inputs"] if i >= 0]
        outs = [tensors[i]["dtype"] for i in op["outputs"] if i >= 0]
        if np.int8 in ins and np.float32 in outs:
            found.add(str(op["op_name"]))
    return found


class _OnnxRunner:
    """Runs one tokenized text through ONNX Runtime at its real length."""

    def __init__(self, path: Path, threads: int) -> None:
        self._session = onnx_session(path, threads)

    def __call__(self, ids: list[int], mask: list[int]) -> tuple[np.ndarray, np.ndarray]:
        feeds = {
            "input_ids": np.array([ids], dtype=np.int64),
            "attention_mask": np.array([mask], dtype=np.int64),
        }
        p_int, p_sen = self._session.run(None, feeds)
        return p_int[0], p_sen[0]


class TfliteRunner:
    """Runs one tokenized text through a TFLite file: through the shortest of its fixed-length
    signatures (``tokens_16``, ``tokens_32``, ...) that holds the text, zero-padded to that length.

    Padding cannot change the result: padded positions are masked out of attention and of the pooling
    (the export checks every signature against PyTorch at several real lengths). A TFLite interpreter
    is not thread-safe and ``EdgeModels`` shares one classifier between every ``Pipeline`` (and
    ``Device``) of a process, so calls take turns on a lock.
    """

    def __init__(self, path: Path, threads: int) -> None:
        interpreter = tflite_interpreter(path, threads)
        runners: dict[int, tuple[Any, Any, Any]] = {}
        for name, io in interpreter.get_signature_list().items():
            match = _TFLITE_SIGNATURE.fullmatch(name)
            if not match or sorted(io["inputs"]) != sorted(TFLITE_INPUTS):
                continue
            if sorted(io["outputs"]) != sorted(TFLITE_OUTPUTS):
                continue
            runner = interpreter.get_signature_runner(name)
            details = runner.get_input_details()
            length = int(match.group(1))
            shape = [int(d) for d in details["input_ids"]["shape"]]
            if shape != [1, length]:
                raise ModelError(f"{path}: signature {name} takes {shape}, expected [1, {length}]")
            runners[length] = (runner, details["input_ids"]["dtype"], details["attention_mask"]["dtype"])
        if not runners:
            raise ModelError(f"{path}: no classifier signature (tokens_<L>) in this TFLite file")
        self._interpreter = interpreter  # the runners borrow it
        self._lock = threading.Lock()
        self._runners = dict(sorted(runners.items()))
        #: Input lengths of the file's signatures, shortest first.
        self.lengths = list(self._runners)

    def __call__(self, ids: list[int], mask: list[int]) -> tuple[np.ndarray, np.ndarray]:
        n = len(ids)
        length = next((m for m in self.lengths if m >= n), None)
        if length is None:
            raise ValueError(f"{n} tokens; the TFLite model takes at most {self.lengths[-1]}")
        runner, ids_dtype, mask_dtype = self._runners[length]
        fixed_ids = np.zeros((1, length), dtype=ids_dtype)
        fixed_mask = np.zeros((1, length), dtype=mask_dtype)
        fixed_ids[0, :n] = ids
        fixed_mask[0, :n] = mask
        with self._lock:  # the outputs live in the interpreter's buffers until the next call: copy them
            out = runner(input_ids=fixed_ids, attention_mask=fixed_mask)
            return np.array(out[TFLITE_OUTPUTS[0]])[0], np.array(out[TFLITE_OUTPUTS[1]])[0]


class TextClassifier:
    """Runs the shipped classifier on normalized text, with ONNX Runtime or a TFLite runtime."""

    def __init__(self, folder: str | Path | None = None, backend: str = "onnx", threads: int = 1) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown classifier backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.backend = backend
        root = models_dir(folder)
        self.meta = ClassifierMeta.load(root / "classifier.json")
        paths = {key: root / name for key, name in self.meta.files.items()}
        for key in (backend, "tokenizer"):
            if key not in paths:
                raise ModelError(f"{root / 'classifier.json'}: no '{key}' file listed")
            expected = self.meta.sha256.get(key)
            if not paths[key].is_file():
                raise ModelError(f"{paths[key]}: model file not found")
            if expected and sha256_file(paths[key]) != expected:
                raise ModelError(f"{paths[key]}: SHA-256 does not match classifier.json; refusing to load it")

        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(paths["tokenizer"]))
        # The tokenizer file may carry fixed-length padding (MiniLM's pads to 128): every ONNX query would
        # then cost 128 positions. Real length only; the TFLite runner pads to its own fixed length.
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(self.meta.max_tokens)
        self._run: _OnnxRunner | TfliteRunner = (
            _OnnxRunner(paths["onnx"], threads)
            if backend == "onnx"
            else TfliteRunner(paths["tflite"], threads)
        )

    def probabilities(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Raw (interest, sensitivity) probability matrices for already normalized texts.

        Each text runs alone, at batch size 1, as the device classifies one utterance at a time: the
        sensitivity threshold was calibrated that way, and no neighbour can influence a text's scores.
        """
        interest, sensitive = [], []
        for text in texts:
            enc = self._tokenizer.encode(text)
            p_int, p_sen = self._run(enc.ids, enc.attention_mask)
            interest.append(p_int)
            sensitive.append(p_sen)
        return np.stack(interest), np.stack(sensitive)

    def classify_batch(self, texts: list[str]) -> list[ClassifierOutput]:
        normalized = [normalize_text(t) or "." for t in texts]
        interest, sensitive = self.probabilities(normalized)
        return outputs_from_probabilities(self.meta, interest, sensitive)

    def classify(self, text: str) -> ClassifierOutput:
        return self.classify_batch([text])[0]
