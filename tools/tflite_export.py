"""Export the Sotto text classifier to TFLite (LiteRT) and run it.

Status: the conversion step of the planned TFLite backend. It is measured (MiniLM + two heads: the int8
file agrees with PyTorch float on 99.4% of top categories and 100% of sensitive decisions, 1.3 ms per
query at 32 tokens with XNNPACK) but not yet called by tools/build_models.py, and the edge runtime does
not load TFLite files yet.

Recipe:

1. The model is traced by ``litert_torch.convert`` (torch.export -> StableHLO -> TFLite; no ONNX or
   TensorFlow in between) at a fixed shape ``[1, max_tokens]``, from a *padded* sample.
2. While tracing, the 2-D padding mask handed to every Hugging Face model inside it is turned into a
   4-D additive float mask by a forward pre-hook (``_additive_attention_masks``). Without it,
   transformers' mask builder indexes a bool tensor, which lowers to ``GATHER_ND`` v5: tflite-runtime
   2.14 refuses such a file ("Didn't find op for builtin opcode 'GATHER_ND' version '5'").
3. ``quantize="dynamic_int8"`` runs the AI Edge Quantizer on the float file: symmetric per-channel int8
   weights for every fully connected layer and the embedding table, activations quantized at run time
   (XNNPACK does it per token row, which is why this stays closer to float than ONNX Runtime's
   per-tensor dynamic int8). ``"weight_only_int8"``: same size on disk, weights dequantized to float
   (slower, more RAM, but the one int8 file tflite-runtime 2.14 computes correctly).
4. Before anything is written, the file is run against the PyTorch model on probes padded to several
   lengths, so a graph that froze the tracing sample's padding is never shipped.

Converting needs ``litert-torch`` (it pulls ai-edge-litert, ai-edge-quantizer, litert-converter and
jax, hence numpy >= 2). Running needs only numpy and ``ai-edge-litert``, or ``tflite-runtime`` for the
files it handles (see ``load_interpreter``). The file's inputs are int32 ``input_ids`` and
``attention_mask`` of shape ``[1, max_tokens]`` (the converter narrows int64), its outputs float32
``interest_probs`` and ``sensitive_probs``, all in the ``serving_default`` signature.
"""

from __future__ import annotations

import functools
import inspect
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

QUANTIZE_MODES = ("none", "dynamic_int8", "weight_only_int8")
SIGNATURE = "serving_default"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("interest_probs", "sensitive_probs")

# Largest |p_tflite - p_torch| accepted for the float export on the built-in probes. Measured float
# differences are ~1e-6; anything near this bound means a broken lowering, not rounding.
_FLOAT_TOLERANCE = 1e-3


def export_tflite(model: Any, out: Path, max_tokens: int, quantize: str) -> None:
    """Convert ``model`` to a TFLite file at ``out`` with fixed inputs ``[1, max_tokens]``.

    ``model.forward(input_ids, attention_mask)`` takes int64 ``[1, max_tokens]`` tensors (padding id 0,
    mask 1 for real tokens) and returns ``(interest_probs, sensitive_probs)``. ``quantize`` is one of
    ``QUANTIZE_MODES``. The model's train/eval mode is restored afterwards; its weights are not touched.
    Raises RuntimeError if the converted file disagrees with PyTorch on padded probes.
    """
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantize mode {quantize!r}; choose one of {', '.join(QUANTIZE_MODES)}")
    if max_tokens < 2:
        raise ValueError("max_tokens must be at least 2")

    import litert_torch
    import torch

    named = _named_outputs(model)
    was_training = model.training
    model.eval()  # dropout off; tracing in train mode would bake random masks into the graph
    try:
        # Trace from a padded sample: a mask of all ones lets code paths that special-case "no padding"
        # (transformers skips the mask then, outside torch.export) become the traced graph.
        sample_ids, sample_mask = _probe_batch(max_tokens, lengths=[max(2, max_tokens // 2)])
        sample = {
            "input_ids": torch.from_numpy(sample_ids).to(torch.int64),
            "attention_mask": torch.from_numpy(sample_mask).to(torch.int64),
        }
        with torch.no_grad(), _additive_attention_masks(model):
            edge = litert_torch.convert(named, sample_kwargs=sample, enable_x64=False)
        content = bytes(edge.model_content())
        del edge
        if quantize != "none":
            content = _quantize(content, quantize)
        _check_against_torch(model, content, max_tokens, quantize)
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


def tflite_probabilities(
    path: Path, ids: np.ndarray, mask: np.ndarray, threads: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Run token rows through a file made by ``export_tflite``; returns (interest, sensitive) [n, k].

    ``ids`` and ``mask`` are ``[n, L]`` (or ``[L]``) integer arrays of any integer dtype, tokenized with
    truncation to the model's length. Rows are zero-padded (id 0, mask 0) to that fixed length, so a
    tokenizer that pads to the longest row of a batch, as the ONNX path does, can feed this directly;
    extra columns are dropped only if they are padding. The graph has batch size 1: rows run one after
    another. Interpreters are cached per (file, threads) and are not thread-safe: one calling thread
    per cached interpreter.
    """
    ids = np.atleast_2d(np.asarray(ids))
    mask = np.atleast_2d(np.asarray(mask))
    if ids.shape != mask.shape:
        raise ValueError(f"ids {ids.shape} and mask {mask.shape} differ in shape")
    path = Path(path).resolve()
    stat = path.stat()
    session = _session(str(path), stat.st_mtime_ns, stat.st_size, threads)
    ids_index, ids_dtype = session.inputs["input_ids"]
    mask_index, mask_dtype = session.inputs["attention_mask"]

    n, width = ids.shape
    fixed_ids = np.zeros((n, session.length), dtype=ids_dtype)
    fixed_mask = np.zeros((n, session.length), dtype=mask_dtype)
    if width > session.length and mask[:, session.length :].any():
        # Cutting here would drop [SEP] and differ from the ONNX path, whose tokenizer truncates.
        raise ValueError(f"rows longer than the model's {session.length} tokens: tokenize with truncation")
    keep = min(width, session.length)
    fixed_ids[:, :keep] = ids[:, :keep]
    fixed_mask[:, :keep] = mask[:, :keep]
    # Ids under mask 0 cannot change the outputs (masked as attention keys, left out of the pooling);
    # zeroing them anyway keeps the inputs identical to what the tokenizer's padding gives ONNX.
    fixed_ids[fixed_mask == 0] = 0

    interest: list[np.ndarray] = []
    sensitive: list[np.ndarray] = []
    interpreter = session.interpreter
    for row in range(n):
        interpreter.set_tensor(ids_index, fixed_ids[row : row + 1])
        interpreter.set_tensor(mask_index, fixed_mask[row : row + 1])
        interpreter.invoke()
        interest.append(interpreter.get_tensor(session.outputs[OUTPUT_NAMES[0]])[0])
        sensitive.append(interpreter.get_tensor(session.outputs[OUTPUT_NAMES[1]])[0])
    return np.stack(interest), np.stack(sensitive)


def load_interpreter(path: Path, threads: int = 1) -> Any:
    """A ready ``Interpreter`` for ``path``: ai-edge-litert, else tflite-runtime where it is safe.

    tflite-runtime (last release 2.14) is only a fallback. It loads every file made here (they avoid
    the bool GATHER_ND it lacks), but it computes dynamic-range int8 files WRONGLY without any error:
    the quantizer does not raise op versions, and 2.14's hybrid FULLY_CONNECTED / EMBEDDING_LOOKUP
    kernels misread per-channel scales (measured: 3% top-class agreement). So on tflite-runtime a file
    whose float ops read int8 weights directly is refused; float and weight-only int8 files run
    identically on both runtimes.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise RuntimeError("no TFLite runtime: pip install ai-edge-litert") from None
    try:
        interpreter = Interpreter(model_path=str(path), num_threads=threads)
    except (ValueError, RuntimeError, SystemError) as exc:
        raise RuntimeError(f"{path}: the TFLite runtime cannot load this model ({exc})") from exc
    if Interpreter.__module__.startswith("tflite_runtime"):
        hybrid = _hybrid_ops(interpreter)
        if hybrid:
            raise RuntimeError(
                f"{path}: dynamic-range int8 model ({', '.join(sorted(hybrid))} on int8 weights); "
                "tflite-runtime 2.14 gives wrong results for it. Use ai-edge-litert, or export with "
                "quantize='weight_only_int8' or 'none' for tflite-runtime devices."
            )
    interpreter.allocate_tensors()
    return interpreter


def _hybrid_ops(interpreter: Any) -> set[str]:
    """Names of ops that take an int8 tensor and give a float one, other than DEQUANTIZE (hybrid ops)."""
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    try:
        ops = interpreter._get_ops_details()  # private, but present in tflite-runtime 2.5 .. 2.14
    except AttributeError:
        # Cannot tell hybrid from weight-only: any int8 tensor counts as unsafe.
        return {"int8 tensors"} if any(t["dtype"] == np.int8 for t in tensors.values()) else set()
    found = set()
    for op in ops:
        if op["op_name"] == "DEQUANTIZE":
            continue
        ins = [tensors[i]["dtype"] for i in op["inputs"] if i >= 0]
        outs = [tensors[i]["dtype"] for i in op["outputs"] if i >= 0]
        if np.int8 in ins and np.float32 in outs:
            found.add(op["op_name"])
    return found


@dataclass(frozen=True)
class _Session:
    """A loaded interpreter and where its named inputs and outputs live."""

    interpreter: Any
    length: int
    inputs: dict[str, tuple[int, Any]]  # name -> (tensor index, numpy dtype)
    outputs: dict[str, int]  # name -> tensor index


@functools.lru_cache(maxsize=8)
def _session(path: str, mtime_ns: int, size: int, threads: int) -> _Session:
    # mtime and size are part of the cache key so that a rebuilt file is reloaded, not served stale.
    del mtime_ns, size
    interpreter = load_interpreter(Path(path), threads)
    signatures = interpreter.get_signature_list()
    if SIGNATURE not in signatures:
        raise RuntimeError(f"{path}: no {SIGNATURE!r} signature; was it made by export_tflite?")
    names = signatures[SIGNATURE]
    if sorted(names["inputs"]) != sorted(INPUT_NAMES) or sorted(names["outputs"]) != sorted(OUTPUT_NAMES):
        raise RuntimeError(f"{path}: unexpected signature {names}")
    # Signature names map to plain tensor indices once, here; inference then uses only set_tensor /
    # invoke / get_tensor, the calls every TFLite runtime (and the C API) has.
    runner = interpreter.get_signature_runner(SIGNATURE)
    in_details = runner.get_input_details()
    out_details = runner.get_output_details()
    shape = tuple(int(d) for d in in_details["input_ids"]["shape"])
    if len(shape) != 2 or shape[0] != 1:
        raise RuntimeError(f"{path}: expected input shape [1, L], found {list(shape)}")
    # The converter downcasts int64 to int32 (most kernels and delegates have no int64); read the
    # dtype from the file rather than assume it, so an enable_x64 export would work too.
    return _Session(
        interpreter=interpreter,
        length=shape[1],
        inputs={name: (int(in_details[name]["index"]), in_details[name]["dtype"]) for name in INPUT_NAMES},
        outputs={name: int(out_details[name]["index"]) for name in OUTPUT_NAMES},
    )


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


@contextmanager
def _additive_attention_masks(model: Any) -> Iterator[None]:
    """While active, Hugging Face models inside ``model`` get a 4-D additive mask instead of a 2-D one.

    transformers 5 builds the attention mask with ``padding_mask[batch_idx, kv_idx]``; traced, that is a
    GATHER_ND on a bool tensor (op version 5), which tflite-runtime 2.14 cannot load. transformers
    passes a 4-D mask through untouched, and ``(1 - mask) * finfo.min`` added to the attention scores
    is the same masking (it is what older transformers releases computed for BERT), built from SUB/MUL.
    Every ``PreTrainedModel`` whose forward takes ``attention_mask`` is hooked; a nested one then sees
    the 4-D mask and leaves it alone.
    """
    import torch
    from transformers import PreTrainedModel

    handles = []
    for module in model.modules():
        if not isinstance(module, PreTrainedModel):
            continue
        params = inspect.signature(module.forward).parameters
        if "attention_mask" not in params:
            continue
        position = list(params).index("attention_mask")

        def hook(
            mod: torch.nn.Module,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            position: int = position,
        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
            in_args = position < len(args)
            mask = args[position] if in_args else kwargs.get("attention_mask")
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                return args, kwargs  # None, or already 4-D (e.g. an outer encoder hooked first)
            dtype = getattr(mod, "dtype", torch.float32)  # the model's float dtype, as transformers uses
            additive = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
            if in_args:
                args = (*args[:position], additive, *args[position + 1 :])
            else:
                kwargs = {**kwargs, "attention_mask": additive}
            return args, kwargs

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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


def _check_against_torch(model: Any, content: bytes, max_tokens: int, quantize: str) -> None:
    """Compare the converted file with PyTorch on padded probes of several lengths.

    A graph that kept the tracing sample's padding would match at that length only, so the probes
    include the shortest, longest and an unpadded row. Float must match to rounding; int8 files must
    at least give finite probabilities that sum to one (their agreement is measured on real queries).
    """
    import torch

    lengths = sorted({1, 2, 3, max_tokens // 3, max_tokens // 2 + 1, max_tokens - 1, max_tokens})
    ids, mask = _probe_batch(max_tokens, [n for n in lengths if n >= 1])
    with torch.no_grad():
        expected = model(torch.from_numpy(ids), torch.from_numpy(mask))
    expected_np = [t.detach().cpu().numpy() for t in expected]

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.tflite"
        path.write_bytes(content)
        got = tflite_probabilities(path, ids, mask)
        _session.cache_clear()  # drop the interpreter on the temporary file before it is deleted

    for name, want, have in zip(OUTPUT_NAMES, expected_np, got, strict=True):
        if have.shape != want.shape:
            raise RuntimeError(f"{name}: TFLite shape {have.shape}, PyTorch {want.shape}")
        if not np.all(np.isfinite(have)) or not np.allclose(have.sum(-1), 1.0, atol=1e-3):
            raise RuntimeError(f"{name}: TFLite output is not a probability vector")
        diff = float(np.abs(have - want).max())
        if quantize == "none" and diff > _FLOAT_TOLERANCE:
            raise RuntimeError(f"{name}: float TFLite differs from PyTorch by {diff:.2e} on padded probes")
