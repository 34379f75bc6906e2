"""The engine dtype: `auto` must pick float32 where bf16 is emulated, and every piece that builds
embeddings for the engine (remote engine, plain vLLM command, ECO job) must follow the same choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unlearnd.engine.dtype import resolve_dtype
from unlearnd.engine.remote import RemoteVLLMEngine, plain_vllm_command


@pytest.mark.parametrize("cuda, expected", [(False, "float32"), (True, "bfloat16")])
def test_auto_picks_bf16_only_on_gpus(monkeypatch, cuda, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert resolve_dtype("auto") == expected


def test_explicit_dtype_wins_and_unknown_is_refused(monkeypatch):
    assert resolve_dtype("bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8")


def test_plain_vllm_and_remote_engine_follow_the_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cmd = plain_vllm_command("/m", 9000, "m")
    assert cmd[cmd.index("--dtype") + 1] == "float32"
    cmd = plain_vllm_command("/m", 9000, "m", dtype="bfloat16")
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"
    assert RemoteVLLMEngine("http://x", "/m", "m").dtype == "float32"
    assert RemoteVLLMEngine("http://x", "/m", "m", dtype="bfloat16").dtype == "bfloat16"


def test_eco_job_tunes_in_the_serving_dtype(monkeypatch, tmp_path: Path):
    from unlearnd.domain import ForgetRequest, ForgetSpec, Method, Status
    from unlearnd.train import eco
    from unlearnd.train.job import JobContext

    seen = {}
    monkeypatch.setattr(eco, "train_eco", lambda *a, **kw: seen.update(kw) or {})
    monkeypatch.setattr(JobContext, "model_path", lambda self: "/m")
    request = ForgetRequest(
        id="r1",
        name="A",
        method=Method.eco,
        status=Status.training,
        created_at=0.0,
        updated_at=0.0,
        artifact_dir=str(tmp_path),
        spec=ForgetSpec(name="A", method=Method.eco, forget=["Who is A? A is a writer."]),
    )
    eco.eco_job(request, tmp_path, JobContext(registry=None, model="/m", serve_dtype="float32"))
    assert seen["overrides"] == {"serve_dtype": "float32"}
    eco.eco_job(request, tmp_path, JobContext(registry=None, model="/m", serve_dtype="bfloat16"))
    assert seen["overrides"] == {"serve_dtype": "bfloat16"}
