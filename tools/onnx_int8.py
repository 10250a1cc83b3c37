"""Weight-only int8 for the classifier's ONNX file: the same integers the TFLite file carries.

Every large weight (the MatMul and Gemm weights of the encoder and heads, the token and position
embedding tables) is stored as int8 with one symmetric scale per output channel (per row for the
embedding tables); activations stay float32. Compared with ONNX Runtime's dynamic quantization, which
quantizes activations with one scale per tensor at run time, this changes far fewer decisions (the
file's outputs are those of the float model with rounded weights), and it is exactly what the TFLite
converter's weight-only int8 mode does, so both device runtimes compute the same function.

Layout in the graph:
- MatMul/Gemm weight ``W`` becomes ``DequantizeLinear(W_q, scale, axis)``. The device opens the file
  with ``session.disable_quant_qdq = 1``, so ONNX Runtime folds these into float32 weights once at
  load time (fast float matmuls, ~43 MB of RAM) instead of dequantizing at every run.
- An embedding lookup ``Gather(table, ids)`` becomes ``Cast(Gather(table_q, ids)) * Gather(scale, ids)``:
  only the rows that a query uses are ever dequantized, so the 30k-row table stays int8 in memory.

``quantize_symmetric`` is the rounding rule; ``tools/build_models.py`` applies it to the PyTorch weights
before either export, so the ONNX and TFLite quantizers both find weights already on the int8 grid
(re-quantizing them is exact) and the two files hold the very same numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Weights smaller than this stay float32 (biases, LayerNorm, the 2-row token-type table).
MIN_ELEMENTS = 4096


def quantize_symmetric(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 values and float32 scales with ``weight ~= q * scale`` along ``axis`` (per channel).

    The scale is max|w| / 127 of each channel, the integers round half to even and lie in [-127, 127]
    (never -128, so negation is exact), as the TFLite and ONNX Runtime quantizers do.
    """
    w = np.asarray(weight, dtype=np.float32)
    reduce = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    peak = np.max(np.abs(w), axis=reduce, keepdims=True)
    scale = np.where(peak > 0, peak / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return q, scale.reshape(-1)


def fake_quantize(weight: np.ndarray, axis: int) -> np.ndarray:
    """``weight`` rounded to its int8 grid, as float32 (what the device will compute with)."""
    q, scale = quantize_symmetric(weight, axis)
    shape = [1] * weight.ndim
    shape[axis % weight.ndim] = -1
    return (q.astype(np.float32) * scale.reshape(shape)).astype(np.float32)


def quantize_onnx_weights(model: Any) -> Any:
    """Return a copy of an ONNX ``model`` with its large weights stored as int8 (see module doc)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1

    replaced: dict[str, onnx.TensorProto] = {}
    new_inits: list[onnx.TensorProto] = []
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in ("MatMul", "Gemm"):
            name = node.input[1]
            init = inits.get(name)
            if init is not None and len(init.dims) == 2 and np.prod(init.dims) >= MIN_ELEMENTS:
                if consumers[name] != 1:
                    raise ValueError(f"weight {name} is shared by several nodes; not handled")
                w = numpy_helper.to_array(init)
                # Output channels: columns of a MatMul weight [K, N]; rows of a Gemm weight with transB.
                axis = 0 if (node.op_type == "Gemm" and attrs.get("transB", 0)) else 1
                q, scale = quantize_symmetric(w, axis)
                new_inits += [
                    numpy_helper.from_array(q, f"{name}_int8"),
                    numpy_helper.from_array(scale, f"{name}_scale"),
                ]
                new_nodes.append(
                    helper.make_node(
                        "DequantizeLinear",
                        [f"{name}_int8", f"{name}_scale"],
                        [f"{name}_dequantized"],
                        axis=axis,
                        name=f"{name}_dequantize",
                    )
                )
                node.input[1] = f"{name}_dequantized"
                replaced[name] = init
        elif node.op_type == "Gather":
            name = node.input[0]
            init = inits.get(name)
            if (
                init is not None
                and len(init.dims) == 2
                and np.prod(init.dims) >= MIN_ELEMENTS
                and attrs.get("axis", 0) == 0
            ):
                if consumers[name] != 1:
                    raise ValueError(f"table {name} is shared by several nodes; not handled")
                q, scale = quantize_symmetric(numpy_helper.to_array(init), 0)
                new_inits += [
                    numpy_helper.from_array(q, f"{name}_int8"),
                    numpy_helper.from_array(scale.reshape(-1, 1), f"{name}_scale"),
                ]
                out = node.output[0]
                ids = node.input[1]
                new_nodes += [
                    helper.make_node("Gather", [f"{name}_int8", ids], [f"{out}_int8"], axis=0),
                    helper.make_node("Cast", [f"{out}_int8"], [f"{out}_float"], to=onnx.TensorProto.FLOAT),
                    helper.make_node("Gather", [f"{name}_scale", ids], [f"{out}_scale"], axis=0),
                    helper.make_node("Mul", [f"{out}_float", f"{out}_scale"], [out]),
                ]
                replaced[name] = init
                continue
        new_nodes.append(node)

    kept = [i for i in graph.initializer if i.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    del graph.node[:]
    graph.node.extend(new_nodes)
    if not any(op.domain in ("", "ai.onnx") and op.version >= 13 for op in model.opset_import):
        raise ValueError("per-channel DequantizeLinear needs opset 13 or newer")
    onnx.checker.check_model(model)
    return model
