"""Export the Sotto text classifier to TFLite (LiteRT).

tools/build_models.py calls ``export_tflite(..., quantize="weight_only_int8")`` to write
models/classifier.tflite, which the device runs with ``TextClassifier(backend="tflite")``
(edge/classifier.py). The model's weights are rounded to int8 before the call, so the quantizer finds
them on its grid and the file holds the same numbers as models/classifier.onnx.

Recipe:

1. The model is traced by ``litert_torch.convert`` (torch.export -> StableHLO -> TFLite; no ONNX or
   TensorFlow in between) from *padded* samples, once per input length in ``lengths`` (16, 32 and 64
   tokens by default): one signature ``tokens_<L>`` per length, in one file that stores the weights
   once. TFLite graphs have fixed shapes, and a transformer's cost grows with its input length: the
   device runs a query through the shortest signature that holds it (a typical voice query is under 16
   tokens), instead of always paying for 64.
2. The model must hand its attention layers a 4-D additive float mask (``additive_attention_mask``),
   as the classifier of tools/build_models.py does by running the encoder's layers itself: a Hugging
   Face model's own forward builds its mask by indexing a bool tensor, which lowers to ``GATHER_ND``
   v5, and tflite-runtime 2.14 refuses such a file ("Didn't find op for builtin opcode 'GATHER_ND'
   version '5'").
3. ``quantize="weight_only_int8"`` runs the AI Edge Quantizer: symmetric per-channel int8 weights for
   every fully connected layer, float32 compute (the int8 file tflite-runtime 2.14 computes
   correctly). The embedding tables are not left to it: the quantizer would store each table as int8
   behind a ``DEQUANTIZE`` that the runtime computes once per signature, three float copies of the
   30k-row token table (about 47 MB each) held for the life of the interpreter. Instead the traced
   model gathers int8 rows and scales them (``Int8Embedding``, the ONNX file's layout too), so a table
   stays int8 in memory and only the rows of the query are ever made float; same numbers, since the
   tables are already on their int8 grid. ``"dynamic_int8"`` also quantizes activations at run time:
   faster, but its decisions drift from the float model and from ONNX Runtime, so it is not what ships.
4. Before anything is written, every signature is run against the PyTorch model on probes of several
   real lengths, padded, so a graph that froze the tracing sample's padding is never shipped.

Converting needs ``litert-torch`` (it pulls ai-edge-litert, ai-edge-quantizer, litert-converter and
jax, hence numpy >= 2). Running needs only numpy and ``ai-edge-litert``, or ``tflite-runtime`` (see
``edge.classifier.tflite_interpreter``). Each signature's inputs are int32 ``input_ids`` and
``attention_mask`` of shape ``[1, L]`` (the converter narrows int64), its outputs float32
``interest_probs`` and ``sensitive_probs``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sotto.edge.classifier import TFLITE_OUTPUTS, TfliteRunner, tflite_signature

QUANTIZE_MODES = ("none", "dynamic_int8", "weight_only_int8")
#: Input lengths that get a signature; the last is the tokenizer's truncation length.
DEFAULT_LENGTHS = (16, 32, 64)
OUTPUT_NAMES = TFLITE_OUTPUTS

# Largest |p_tflite - p_torch| accepted on the built-in probes (random token ids, so often peaked and
# unusual outputs). Float files differ by ~1e-6. A weight-only int8 file whose weights were already on
# the grid measured up to 7e-3 on the probes (float kernels that round differently, amplified by a
# softmax); a lowering that froze the sample's padding is off by tenths. The real-query agreement is
# measured by tools/evaluate.py and held by tests/edge/test_edge_classifier_parity.py.
_TOLERANCE = {"none": 1e-3, "weight_only_int8": 0.05, "dynamic_int8": 0.5}


def export_tflite(model: Any, out: Path, quantize: str, lengths: Sequence[int] = DEFAULT_LENGTHS) -> None:
    """Convert ``model`` to a TFLite file at ``out``, one signature ``tokens_<L>`` per length.

    ``model.forward(input_ids, attention_mask)`` takes int64 ``[1, L]`` tensors (padding id 0, mask 1
    for real tokens) and returns ``(interest_probs, sensitive_probs)``. ``quantize`` is one of
    ``QUANTIZE_MODES``. The model's train/eval mode is restored afterwards; its weights are not touched.
    Raises RuntimeError if the converted file disagrees with PyTorch on padded probes.
    """
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantize mode {quantize!r}; choose one of {', '.join(QUANTIZE_MODES)}")
    lengths = sorted(set(lengths))
    if not lengths or lengths[0] < 2:
        raise ValueError("lengths must be at least 2 tokens")

    import litert_torch
    import torch

    was_training = model.training
    model.eval()  # dropout off; tracing in train mode would bake random masks into the graph
    try:
        traced = model if quantize == "none" else int8_embeddings(model).eval()
        named = _named_outputs(traced)
        converter: Any = None
        with torch.no_grad():
            for length in lengths:
                # Trace from a padded sample: a mask of all ones lets code paths that special-case "no
                # padding" (transformers skips the mask then, outside torch.export) become the graph.
                sample_ids, sample_mask = _probe_batch(length, lengths=[max(1, length // 2)])
                sample = {
                    "input_ids": torch.from_numpy(sample_ids).to(torch.int64),
                    "attention_mask": torch.from_numpy(sample_mask).to(torch.int64),
                }
                add = litert_torch.signature if converter is None else converter.signature
                converter = add(tflite_signature(length), named, sample_kwargs=sample)
            edge = converter.convert(enable_x64=False)
        content = bytes(edge.model_content())
        del edge
        if quantize != "none":
            content = _quantize(content, quantize)
        _check_against_torch(model, content, lengths, quantize)
    finally:
        model.train(was_training)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename, so that a build interrupted midway never leaves a truncated
    # model where the edge runtime (or a hash in classifier.json) would pick it up.
    part = out.with_name(out.name + ".part")
    try:
        part.write_bytes(content)
        os.replace(part, out)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def int8_embeddings(model: Any) -> Any:
    """A copy of ``model`` whose large embedding tables (``MIN_ELEMENTS`` weights or more) are
    ``Int8Embedding`` modules: int8 rows gathered, then scaled. Raises ValueError for a table that is not
    on its per-row int8 grid (round the weights first: ``tools.build_models.round_weights_to_int8``),
    since the copy must compute exactly what ``model`` computes."""
    import copy

    import torch

    from tools.onnx_int8 import MIN_ELEMENTS, quantize_symmetric

    class Int8Embedding(torch.nn.Module):
        """``table[ids]`` from an int8 table and one float32 scale per row: ``q[ids] * scale[ids]``."""

        def __init__(self, q: np.ndarray, scale: np.ndarray) -> None:
            super().__init__()
            self.register_buffer("q", torch.from_numpy(q))
            self.register_buffer("scale", torch.from_numpy(scale))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.q[ids].to(torch.float32) * self.scale[ids].unsqueeze(-1)

    out = copy.deepcopy(model)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Embedding) and child.weight.numel() >= MIN_ELEMENTS:
                weight = child.weight.detach().cpu().numpy()
                q, scale = quantize_symmetric(weight, axis=0)
                if not np.array_equal(q.astype(np.float32) * scale[:, None], weight):
                    raise ValueError(f"embedding {name!r} is not on its int8 grid; round the weights first")
                setattr(parent, name, Int8Embedding(q, scale))
    return out


def _named_outputs(model: Any) -> Any:
    """Wrap ``model`` so it returns a dict: the TFLite signature then names the outputs, not output_0/1."""
    import torch

    class NamedOutputs(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
            interest, sensitive = self.inner(input_ids, attention_mask)
            return {OUTPUT_NAMES[0]: interest, OUTPUT_NAMES[1]: sensitive}

    return NamedOutputs(model).eval()


def additive_attention_mask(mask: Any, dtype: Any) -> Any:
    """The 4-D additive form ``[batch, 1, 1, tokens]`` of a 2-D padding mask (1 = real token): 0 where
    attention may look, the dtype's lowest value where it may not. What older transformers releases
    added to BERT's attention scores; built from SUB/MUL, ops every runtime here loads."""
    import torch

    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _quantize(content: bytes, mode: str) -> bytes:
    from ai_edge_quantizer import quantizer, recipe

    # dynamic_wi8_afp32: per-channel symmetric int8 weights, int8 compute with activations quantized
    # per inference. weight_only_wi8_afp32: same file size, float compute (slower, closest to float).
    chosen = recipe.dynamic_wi8_afp32() if mode == "dynamic_int8" else recipe.weight_only_wi8_afp32()
    result = quantizer.Quantizer(content, chosen).quantize(enable_progress_report=False)
    if result.quantized_model is None:
        raise RuntimeError("ai-edge-quantizer returned no model")
    return bytes(result.quantized_model)


def _probe_batch(max_tokens: int, lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic token rows of the given real lengths, zero-padded to ``max_tokens``.

    Ids are arbitrary in-vocabulary numbers (100..1099 exist in every BERT-sized vocabulary); the check
    only needs different rows to produce different activations, not meaningful text.
    """
    rng = np.random.default_rng(20261122)
    ids = np.zeros((len(lengths), max_tokens), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        length = min(max(length, 1), max_tokens)
        ids[row, :length] = rng.integers(100, 1100, size=length)
        mask[row, :length] = 1
    return ids, mask


def _check_against_torch(model: Any, content: bytes, lengths: Sequence[int], quantize: str) -> None:
    """Run probes of several real lengths through the file, as the device does (each through the
    shortest signature that holds it, padded), and compare with PyTorch at the real length."""
    import torch

    longest = max(lengths)
    probe_lengths = sorted({1, 2, 3, *lengths, *(n + 1 for n in lengths if n < longest), longest // 3})
    ids, mask = _probe_batch(longest, probe_lengths)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.tflite"
        path.write_bytes(content)
        runner = TfliteRunner(path, threads=1)
        if runner.lengths != list(lengths):
            raise RuntimeError(f"signatures for {runner.lengths} tokens, expected {list(lengths)}")
        for row, n in enumerate(probe_lengths):
            row_ids = ids[row, :n].tolist()
            row_mask = mask[row, :n].tolist()
            with torch.no_grad():
                want = model(torch.tensor([row_ids]), torch.tensor([row_mask]))
            have = runner(row_ids, row_mask)
            for name, w, h in zip(OUTPUT_NAMES, want, have, strict=True):
                w = w[0].numpy()
                if h.shape != w.shape:
                    raise RuntimeError(f"{name}: TFLite shape {h.shape}, PyTorch {w.shape}")
                if not np.all(np.isfinite(h)) or not np.isclose(h.sum(), 1.0, atol=1e-3):
                    raise RuntimeError(f"{name}: TFLite output is not a probability vector")
                diff = float(np.abs(h - w).max())
                if diff > _TOLERANCE[quantize]:
                    raise RuntimeError(
                        f"{name}: TFLite differs from PyTorch by {diff:.2e} at {n} real tokens "
                        f"({quantize}); the lowering is broken"
                    )
        del runner  # release the interpreter before the temporary file goes
