"""TOFU reference models: the *target* (finetuned on the fictitious authors) and the *retain* model
(same recipe, forget authors left out), trained once and cached by content hash.

Forget quality compares a method's forget-set truth ratios with the retain model's, and every
unlearning method starts from the target, so both must exist before any evaluation. Presets:

* `full` - TOFU as published: all 200 authors (4000 QA) vs the same minus the forget split (GPU).
* `mini` - forget01's 2 authors plus the first 6 other authors (whose paraphrased / perturbed answers
  `retain_perturbed` provides): 160 QA for the target, 120 for the retain model, so both train in
  about 25 minutes on a 2-core CPU. Any forget split and author count can be asked for.

Models are cached under `cache_dir()/reference/<hash>` where the hash covers the base model, the
exact training QA and every hyperparameter; a directory appears only complete (tmp dir + rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from unlearnd.artifacts import install_dir, staging_dir, write_json_atomic
from unlearnd.config import cache_dir
from unlearnd.data.tofu import FORGET_SPLITS, TOFU_AUTHORS, TofuData
from unlearnd.domain import QAItem
from unlearnd.models import load_causal_lm
from unlearnd.train.data import QABatches
from unlearnd.train.objectives import Finetune
from unlearnd.train.trainer import TrainConfig, Trainer, TrainResult

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".unlearnd-complete"
INFO_FILE = "unlearnd-model.json"
CODE_VERSION = 1  # bump when the training recipe changes meaning (invalidates caches)


class ReferencePreset(BaseModel):
    """Which authors the reference models see and how they are trained."""

    name: str
    forget_split: str = "forget05"
    n_retain_authors: int | None = Field(10, description="None = every author outside the forget split.")
    epochs: float = 5.0
    learning_rate: float = 1e-5
    batch_size: int = 8
    max_length: int = 256
    warmup_steps: int = 0
    weight_decay: float = 0.01
    seed: int = 0
    # evaluation sizes (items per split; None = all)
    eval_forget_items: int | None = None
    eval_retain_items: int | None = None
    eval_holdout_items: int | None = 100
    eval_real_authors_items: int | None = None
    eval_world_facts_items: int | None = None
    max_new_tokens: int = 96

    def hyperparameters(self) -> dict[str, Any]:
        return self.model_dump(
            include={"epochs", "learning_rate", "batch_size", "max_length", "warmup_steps", "weight_decay", "seed"}
        )


def preset(name: str, forget_split: str | None = None, **overrides: Any) -> ReferencePreset:
    """`mini` (CPU; forget01 by default) or `full` (TOFU as published, forget05 by default; GPU-sized)."""
    forget_split = forget_split or ("forget01" if name == "mini" else "forget05")
    if forget_split not in FORGET_SPLITS:
        raise ValueError(f"forget split must be one of {FORGET_SPLITS}")
    if name == "mini":
        # lr 1e-4 for 4 epochs: TOFU's recipe (1e-5, 5 epochs) does not make a 135M model memorise in a
        # CPU budget; a 4-epoch / 1e-4 pilot on forget01 reached forget ROUGE-L recall 0.86. forget01
        # (40 QA, TOFU's 1% setting) keeps the KS test on 40 truth ratios as in the paper. Evaluation
        # takes every forget01 item (40, each measured by a method fit on the other fold), every retain
        # item of the 6 retain authors (120), both held-out authors (40) and 50 real_authors / world_facts
        # items, with 48 new tokens (TOFU answers' median length); `--limit SPLIT=N` shrinks a split.
        base = ReferencePreset(
            name="mini",
            forget_split=forget_split,
            n_retain_authors=6,
            epochs=4.0,
            learning_rate=1e-4,
            batch_size=8,
            warmup_steps=5,
            eval_forget_items=None,
            eval_retain_items=None,
            eval_holdout_items=None,
            eval_real_authors_items=50,
            eval_world_facts_items=50,
            max_new_tokens=48,
        )
    elif name == "full":
        base = ReferencePreset(
            name="full",
            forget_split=forget_split,
            n_retain_authors=None,
            epochs=5.0,
            learning_rate=1e-5,
            batch_size=32,
            warmup_steps=20,
            eval_forget_items=None,
            eval_retain_items=None,
            eval_holdout_items=None,
            max_new_tokens=200,
        )
    else:
        raise ValueError(f"unknown preset {name!r} (mini | full)")
    return base.model_copy(update=overrides)


class ReferenceData(BaseModel):
    """The QA each reference model trains on and the splits it is evaluated on."""

    forget_authors: list[int]
    retain_authors: list[int]
    holdout_authors: list[int] = Field(default_factory=list)
    target_items: list[QAItem]
    retain_items: list[QAItem]


def reference_data(p: ReferencePreset, tofu: TofuData | None = None) -> ReferenceData:
    tofu = tofu or TofuData()
    forget_authors = tofu.authors_of(p.forget_split)
    others = [a for a in range(TOFU_AUTHORS) if a not in set(forget_authors)]
    retain_authors = others if p.n_retain_authors is None else others[: p.n_retain_authors]
    # held-out (never trained) authors for membership inference: next authors after the retain ones
    holdout = (
        [] if p.n_retain_authors is None else others[p.n_retain_authors : p.n_retain_authors + len(forget_authors)]
    )
    target_items = tofu.by_authors(sorted(set(forget_authors) | set(retain_authors)))
    retain_items = tofu.by_authors(retain_authors)
    return ReferenceData(
        forget_authors=forget_authors,
        retain_authors=retain_authors,
        holdout_authors=holdout,
        target_items=target_items,
        retain_items=retain_items,
    )


# --------------------------------------------------------------------------- hashing / caching


def weights_digest(model_dir: str | Path) -> str | None:
    """sha256 over a model folder's weight files, in name order (None: no weights there, e.g. info files only).

    Unlike `model_fingerprint` it reads every byte: a report records it so that runs measured against
    different weights of one recipe are never merged."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    total = hashlib.sha256()
    for path in files:
        total.update(path.name.encode() + b"\0")
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                total.update(chunk)
    return "sha256:" + total.hexdigest()


def model_fingerprint(model_dir: str | Path) -> str:
    """Cheap identity of a model directory: config + weight file names and sizes + conversion marker."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and (path.suffix in (".json", ".safetensors") or path.name.startswith(".unlearnd")):
            h.update(path.name.encode())
            if path.suffix == ".safetensors":
                h.update(str(path.stat().st_size).encode())
                with path.open("rb") as fh:  # header + first MiB: changes when the weights change
                    h.update(fh.read(1 << 20))
            else:
                h.update(path.read_bytes())
    return h.hexdigest()


def items_digest(items: list[QAItem]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.question, it.answer]).encode())
    return h.hexdigest()


def cache_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).exists()


def read_info(path: Path) -> dict[str, Any]:
    return json.loads((path / INFO_FILE).read_text())


def update_info(path: Path, **fields: Any) -> dict[str, Any]:
    """Add fields to a cached model's info file (tmp + rename, never a half-written file)."""
    info = read_info(path)
    info.update(fields)
    write_json_atomic(path / INFO_FILE, info)
    return info


def save_model_atomic(
    model: torch.nn.Module, tokenizer: Any, target: Path, info: dict[str, Any], dtype: torch.dtype = torch.bfloat16
) -> Path:
    """Write weights + tokenizer + info into a tmp dir, then rename.

    Reference models default to bf16, the dtype vLLM serves, so the in-process target and the served
    target have the same weights; unlearned baselines are saved in float32 (see `train_baseline`).
    """
    staging = staging_dir(target)
    try:
        model.to(dtype).save_pretrained(staging, safe_serialization=True)
        model.to(torch.float32)
        tokenizer.save_pretrained(staging)
        (staging / INFO_FILE).write_text(
            json.dumps({"saved_dtype": str(dtype).removeprefix("torch."), **info}, indent=1, default=str)
        )
        (staging / COMPLETE_MARKER).write_text("ok")
        install_dir(staging, target)  # replaces an incomplete leftover (no marker) or a forced retrain
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def train_result_dict(result: TrainResult) -> dict[str, Any]:
    return {
        "steps": result.steps,
        "wall_seconds": result.wall_seconds,
        "cpu_seconds": result.cpu_seconds,
        "first_loss": result.losses[0] if result.losses else None,
        "final_loss": result.losses[-1] if result.losses else None,
        "losses": result.losses,
    }


def steps_for(epochs: float, n_batches: int) -> int:
    return max(1, math.ceil(epochs * n_batches))


def finetune_cached(
    kind: str,
    items: list[QAItem],
    base_dir: Path,
    hp: dict[str, Any],
    extra: dict[str, Any],
    root: Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Finetune `base_dir` on `items` with the shared trainer; cached by (base, data, hp, kind)."""
    key = cache_key(
        {"kind": kind, "base": model_fingerprint(base_dir), "data": items_digest(items), "hp": hp, "code": CODE_VERSION}
    )
    target = (root or cache_dir() / "reference") / key
    if is_complete(target) and not force:
        log.info("%s model cached at %s", kind, target)
        return target
    model, tokenizer = load_causal_lm(base_dir)
    batches = QABatches(tokenizer, items, hp["batch_size"], hp["max_length"], seed=hp["seed"])
    steps = steps_for(hp["epochs"], len(batches))
    log.info(
        "training %s model: %d QA, %d steps (%s epochs of %d batches)",
        kind,
        len(items),
        steps,
        hp["epochs"],
        len(batches),
    )
    config = TrainConfig(
        steps=steps,
        learning_rate=hp["learning_rate"],
        weight_decay=hp.get("weight_decay", 0.0),
        warmup_steps=hp.get("warmup_steps", 0),
        seed=hp["seed"],
        progress=progress,
    )
    result = Trainer(Finetune(), config).fit(model, batches)
    info = {
        "kind": kind,
        "cache_key": key,
        "base_model": str(base_dir),
        "n_items": len(items),
        "hyperparameters": hp,
        "train": train_result_dict(result),
        **extra,
    }
    return save_model_atomic(model, tokenizer, target, info)


class ReferenceModels(BaseModel):
    preset: ReferencePreset
    target_dir: str
    retain_dir: str
    data: ReferenceData


def ensure_reference_models(
    p: ReferencePreset,
    base_dir: str | Path | None = None,
    force: bool = False,
    tofu: TofuData | None = None,
    which: tuple[str, ...] = ("target", "retain"),
    progress: bool = True,
) -> ReferenceModels:
    """Train (or reuse) the target and retain models of a preset."""
    from unlearnd.models import pull_default

    base = Path(base_dir) if base_dir is not None else pull_default()
    data = reference_data(p, tofu)
    hp = p.hyperparameters()
    common = {"preset": p.name, "forget_split": p.forget_split}
    dirs: dict[str, Path] = {}
    plans = {
        "target": (
            data.target_items,
            {**common, "authors": sorted(set(data.forget_authors) | set(data.retain_authors))},
        ),
        "retain": (data.retain_items, {**common, "authors": data.retain_authors}),
    }
    for kind in ("target", "retain"):
        items, extra = plans[kind]
        if kind not in which:
            key = cache_key(
                {
                    "kind": kind,
                    "base": model_fingerprint(base),
                    "data": items_digest(items),
                    "hp": hp,
                    "code": CODE_VERSION,
                }
            )
            dirs[kind] = cache_dir() / "reference" / key
            continue
        dirs[kind] = finetune_cached(kind, items, base, hp, extra, force=force, progress=progress)
    return ReferenceModels(preset=p, target_dir=str(dirs["target"]), retain_dir=str(dirs["retain"]), data=data)


def forget_rouge(
    model_dir: str | Path, items: list[QAItem], max_new_tokens: int = 96, limit: int | None = None
) -> dict[str, Any]:
    """Greedy ROUGE-L recall of a model on forget items (the memorisation check of the target)."""
    from unlearnd.evaluation.metrics import rouge_backend, rouge_l_recall
    from unlearnd.evaluation.model_under_test import HFModelUnderTest
    from unlearnd.prompting import user_messages

    chosen = items[:limit] if limit else items
    mut = HFModelUnderTest.from_dir(model_dir, name=Path(model_dir).name)
    gens = mut.generate(
        [user_messages(it.question) for it in chosen], max_new_tokens=max_new_tokens, desc="forget ROUGE"
    )
    scores = [rouge_l_recall(it.answer, g) for it, g in zip(chosen, gens)]
    return {
        "forget_rouge_l_recall": float(sum(scores) / len(scores)),
        "n": len(scores),
        "rouge_backend": rouge_backend(),
        "examples": [
            {"question": it.question, "answer": it.answer, "generation": g} for it, g in list(zip(chosen, gens))[:3]
        ],
    }


ReferenceKind = Literal["target", "retain"]
