"""ECO (Liu et al. 2024, "Large Language Model Unlearning via Embedding-Corrupted Prompts").

A flagged prompt is sent to the engine as input embeddings, some of whose entries are corrupted:
Gaussian noise added, zeroed, or sign-flipped, on the first-n dimensions, the top-k |value|
dimensions of each row, or all of them. The rows corrupted are the tokens naming the forget
target (`match.spans`), or, when no entity is named, every token of the user's words but the
last; with scope `prompt`, always the latter (the offline job picks it when corrupting the name
alone cannot bring the answer down to the target: the rest of the question still gives it away).
The strength `sigma` comes from offline zeroth-order tuning (`unlearnd.train.eco`),
which uses the very functions below, so what was tuned is what is served.

Strength semantics (the paper's, made continuous for tuning):
- `noise`: x + sigma * z on the selected entries, z ~ N(0, 1) drawn from a generator seeded by a
  hash of the rendered prompt: the same prompt always gets the same corruption.
- `zero` / `flip`: sigma in [0, 1] is the fraction of the hidden size corrupted; the first
  round(sigma * H) dimensions (`first`) or each row's round(sigma * H) largest-|value| dimensions
  (`topk`) are zeroed / negated. With `all`, every dimension is, whatever sigma.
"""

from __future__ import annotations

import hashlib
import re
from enum import StrEnum
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import BaseModel, Field

from unlearnd.artifacts import ArtifactConfig
from unlearnd.detectors.base import RequestMatch
from unlearnd.domain import ForgetRequest
from unlearnd.guardrail.call import GuardedCall
from unlearnd.interventions.base import Intervention, PipelineContext
from unlearnd.prompting import adds_special_tokens, detector_texts, encode_with_offsets, render


class CorruptionKind(StrEnum):
    noise = "noise"
    zero = "zero"
    flip = "flip"


class DimSelect(StrEnum):
    first = "first"
    topk = "topk"
    all = "all"


class RowScope(StrEnum):
    entity = "entity"  # the tokens naming the forget target (the whole prompt when none is named)
    prompt = "prompt"  # every token of the user's words but the last


class Corruption(BaseModel):
    """What is done to the selected rows: the serve-time part of the ECO artifact."""

    scope: RowScope = RowScope.entity
    kind: CorruptionKind = CorruptionKind.noise
    dims: DimSelect = DimSelect.all
    n_dims: int | None = Field(None, ge=1, description="`noise` with first/topk: how many dimensions.")
    sigma: float = Field(0.0, ge=0.0)

    def count(self, hidden: int) -> int:
        """How many dimensions per row are corrupted."""
        if self.dims == DimSelect.all:
            return hidden
        if self.kind == CorruptionKind.noise:
            return min(self.n_dims or hidden, hidden)
        return max(0, min(hidden, round(self.sigma * hidden)))


class ECOArtifact(ArtifactConfig):
    """eco.json: the corruption, and how it was tuned (target, value reached, fluency)."""

    file_name: ClassVar[str] = "eco.json"

    corruption: Corruption
    seed: int = 0
    entities: list[str] = Field(default_factory=list)
    target: float | None = None
    target_source: str = ""
    clean_value: float | None = None
    achieved: float | None = None
    reached: bool | None = None
    fluency: dict = Field(default_factory=dict)
    tuning: dict = Field(default_factory=dict)


# -- corruption math -------------------------------------------------------------------------


def prompt_seed(text: str, seed: int = 0) -> int:
    """A stable 63-bit seed from the rendered prompt (Python's hash() is salted per process)."""
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dim_mask(rows: torch.Tensor, corruption: Corruption) -> torch.Tensor:
    """Boolean [R, H] mask of the dimensions corrupted in each of `rows` ([R, H])."""
    hidden = rows.shape[-1]
    k = corruption.count(hidden)
    mask = torch.zeros_like(rows, dtype=torch.bool)
    if k == 0 or rows.shape[0] == 0:
        return mask
    if corruption.dims == DimSelect.topk:
        top = rows.abs().topk(k, dim=-1).indices
        mask.scatter_(-1, top, True)
    else:  # first / all
        mask[:, :k] = True
    return mask


def corrupt(embeds: torch.Tensor, rows: list[int] | torch.Tensor, corruption: Corruption, seed: int) -> torch.Tensor:
    """A corrupted copy of `embeds` ([T, H]); only `rows` change. Computed in float32, returned in
    the input dtype. The noise is drawn for the whole [T, H] shape so it depends only on the seed
    and the prompt length, not on which rows are selected."""
    out = embeds.detach().to(torch.float32).clone()
    index = torch.as_tensor(rows, dtype=torch.long, device=out.device)
    if index.numel() == 0 or (corruption.kind == CorruptionKind.noise and corruption.sigma == 0.0):
        return out.to(embeds.dtype)
    selected = out[index]
    mask = dim_mask(selected, corruption)
    if corruption.kind == CorruptionKind.noise:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(out.shape, generator=generator, dtype=torch.float32)[index.cpu()].to(out.device)
        selected = selected + corruption.sigma * noise * mask
    elif corruption.kind == CorruptionKind.zero:
        selected = selected.masked_fill(mask, 0.0)
    else:
        selected = torch.where(mask, -selected, selected)
    out[index] = selected
    return out.to(embeds.dtype)


# -- which tokens -----------------------------------------------------------------------------


def query_segments(rendered: str, texts: list[str]) -> list[tuple[int, int, int]]:
    """Where the detector's texts sit in the rendered prompt: (query offset, rendered offset, length)
    per text found there, given `query_text == prompting.detector_text(...)` (the texts joined by
    newlines); a text the template does not render (a `name`) is skipped."""
    segments, cursor, q_offset = [], 0, 0
    for text in texts:
        pos = rendered.find(text, cursor) if text else -1
        if pos >= 0:
            segments.append((q_offset, pos, len(text)))
            cursor = pos + len(text)
        q_offset += len(text) + 1
    return segments


def map_spans(spans: list[tuple[int, int]], segments: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """Character spans of the query text -> character spans of the rendered prompt."""
    mapped = []
    for start, end in spans:
        for q0, r0, length in segments:
            lo, hi = max(start, q0), min(end, q0 + length)
            if lo < hi:
                mapped.append((r0 + lo - q0, r0 + hi - q0))
    return mapped


def rows_overlapping(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Token indices whose character range overlaps any span (special tokens have empty ranges)."""
    return [i for i, (a, b) in enumerate(offsets) if b > a and any(a < e and b > s for s, e in spans)]


def entity_spans(text: str, entities: list[str]) -> list[tuple[int, int]]:
    """Spans of the entity names in `text` (case-insensitive, whole words): the offline stand-in
    for `match.spans` when the detector gives none."""
    spans = []
    for entity in entities:
        if entity.strip():
            pattern = re.compile(r"(?<!\w)" + re.escape(entity.strip()) + r"(?!\w)", re.IGNORECASE)
            spans += [m.span() for m in pattern.finditer(text)]
    return sorted(spans)


def select_rows(
    tokenizer,
    rendered: str,
    texts: list[str],
    spans: list[tuple[int, int]],
    add_special_tokens: bool,
    scope: RowScope = RowScope.entity,
) -> tuple[list[int], list[int], str]:
    """Tokenise the rendered prompt and pick the rows to corrupt.

    Returns (ids, rows, mode): mode "entity" when spans map to tokens, else "prompt": every token
    of the detector's texts (the messages' words) but the last one (or every prompt token but the
    last, if they cannot be found in the rendered text); scope `prompt` always takes the latter."""
    ids, offsets = encode_with_offsets(tokenizer, rendered, add_special_tokens)
    segments = query_segments(rendered, texts)
    if spans and scope == RowScope.entity:
        rows = rows_overlapping(offsets, map_spans(spans, segments))
        if rows:
            return ids, rows, "entity"
    if segments:
        rows = rows_overlapping(offsets, [(r0, r0 + n) for _, r0, n in segments])
    else:
        rows = [i for i, (a, b) in enumerate(offsets) if b > a]
    return ids, rows[:-1], "prompt"


class ECO(Intervention):
    def __init__(self) -> None:
        super().__init__()
        self.artifacts: dict[str, ECOArtifact] = {}

    def load(self, request: ForgetRequest, artifact_dir: Path) -> None:
        self.artifacts[request.id] = ECOArtifact.read(artifact_dir)
        super().load(request, artifact_dir)

    def unload(self, request_id: str) -> None:
        self.artifacts.pop(request_id, None)
        super().unload(request_id)

    def apply(self, call: GuardedCall, match: RequestMatch, ctx: PipelineContext) -> None:
        artifact = self.artifacts[match.request_id]
        rendered = render(ctx.tokenizer, call.messages, call.prompt)
        spans = list(match.spans) or entity_spans(call.query_text, artifact.entities)
        ids, rows, _ = select_rows(
            ctx.tokenizer,
            rendered,
            detector_texts(call.messages, call.prompt),
            spans,
            add_special_tokens=adds_special_tokens(call.messages),
            scope=artifact.corruption.scope,
        )
        embeds = ctx.embeddings.lookup(ids)
        call.prompt_token_ids = ids
        call.prompt_embeds = corrupt(embeds, rows, artifact.corruption, prompt_seed(rendered, artifact.seed))
