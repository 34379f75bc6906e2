"""Adapters placed for vLLM's filesystem resolver (`--remote-lora-dir`): what a server behind a router
resolves by name must be the adapter unlearnd serves, for the server's own base model."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from unlearnd.engine.adapter_dir import CONFIG, place_adapter, remove_adapters
from unlearnd.engine.base import EngineError, LoRASpec
from unlearnd.engine.remote import RemoteVLLMEngine


def _adapter(folder: Path, weights: bytes = b"weights") -> Path:
    folder.mkdir(parents=True)
    (folder / CONFIG).write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "/train/model", "r": 8}))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def test_an_adapter_is_placed_under_its_name_for_the_servers_base_model(tmp_path):
    source = _adapter(tmp_path / "artifact" / "adapter")
    shared = tmp_path / "shared"
    shared.mkdir()
    dest = place_adapter(source, shared, "fr-1-v2", "/models/SmolLM2")
    assert dest == shared / "fr-1-v2"
    config = json.loads((dest / CONFIG).read_text())
    assert config["base_model_name_or_path"] == "/models/SmolLM2" and config["r"] == 8
    assert (dest / "adapter_model.safetensors").read_bytes() == b"weights"
    assert json.loads((source / CONFIG).read_text())["base_model_name_or_path"] == "/train/model"  # source untouched
    assert [p.name for p in shared.iterdir()] == ["fr-1-v2"]  # no staging folder left


def test_a_folder_already_there_is_checked_not_trusted(tmp_path):
    source = _adapter(tmp_path / "artifact")
    shared = tmp_path / "shared"
    _adapter(shared / "fr-1-v2", weights=b"someone else's weights")
    dest = place_adapter(source, shared, "fr-1-v2", None)
    assert (dest / "adapter_model.safetensors").read_bytes() == b"weights"
    mtime = (dest / "adapter_model.safetensors").stat().st_mtime_ns
    place_adapter(source, shared, "fr-1-v2", None)  # the same adapter: left as it is
    assert (dest / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in shared.iterdir()) == ["fr-1-v2"]


def test_removing_a_request_takes_all_its_adapters_and_no_other(tmp_path):
    shared = tmp_path / "shared"
    for name in ("fr-1-v1", "fr-1-v2-s0.5", "fr-10-v1", "fr-2-v1", ".fr-1-v3.abc123", ".fr-10-v2.def456"):
        _adapter(shared / name)
    assert sorted(remove_adapters(shared, "fr-1")) == ["fr-1-v1", "fr-1-v2-s0.5"]
    assert sorted(p.name for p in shared.iterdir()) == [".fr-10-v2.def456", "fr-10-v1", "fr-2-v1"]


def test_a_scaled_copy_is_told_apart_by_its_config_and_a_copy_placed_meanwhile_is_kept(tmp_path, monkeypatch):
    import unlearnd.engine.adapter_dir as adapter_dir

    source = _adapter(tmp_path / "artifact")
    shared = tmp_path / "shared"
    shared.mkdir()
    stale = _adapter(shared / "fr-1-v1")
    config = json.loads((stale / CONFIG).read_text())
    (stale / CONFIG).write_text(json.dumps({**config, "lora_alpha": 4}))  # same weights, another scale
    dest = place_adapter(source, shared, "fr-1-v1", None)
    assert "lora_alpha" not in json.loads((dest / CONFIG).read_text())
    # another replica places the same adapter while this one copies: its copy is kept, not swapped out
    real_copytree, inode = adapter_dir.shutil.copytree, []

    def copy_while_another_places(src, dst, **kw):
        if not inode:  # the other replica's placement, complete before this one's rename
            real_copytree(src, shared / "fr-2-v1")
            inode.append((shared / "fr-2-v1").stat().st_ino)
        return real_copytree(src, dst, **kw)

    monkeypatch.setattr(adapter_dir.shutil, "copytree", copy_while_another_places)
    place_adapter(source, shared, "fr-2-v1", None)
    assert (shared / "fr-2-v1").stat().st_ino == inode[0]
    assert sorted(p.name for p in shared.iterdir()) == ["fr-1-v1", "fr-2-v1"]  # no staging folder left


def test_a_source_without_a_config_fails_and_leaves_nothing(tmp_path):
    source = tmp_path / "broken"
    source.mkdir()
    (source / "adapter_model.safetensors").write_bytes(b"w")
    shared = tmp_path / "shared"
    shared.mkdir()
    with pytest.raises(FileNotFoundError):
        place_adapter(source, shared, "fr-1-v1", "/models/x")
    assert list(shared.iterdir()) == []


class FakeServer:
    """A vLLM server's answers to what the remote engine sends: its model card, completions, adapter calls."""

    def __init__(self, resolves: bool = True):
        self.resolves, self.calls = resolves, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request.url.path)
        if request.url.path == "/v1/models":
            card = {"id": "m", "root": "/models/SmolLM2", "max_model_len": 2048}
            return httpx.Response(200, json={"data": [card]})
        if request.url.path == "/v1/completions":
            if not self.resolves:
                return httpx.Response(404, json={"error": {"message": "The model `fr-1-v1` does not exist."}})
            return httpx.Response(200, json={"choices": [{"index": 0, "text": "x"}]})
        return httpx.Response(200, text="ok")


def _engine(server: FakeServer, lora_dir: Path) -> RemoteVLLMEngine:
    engine = RemoteVLLMEngine("http://vllm", "/nonexistent", "m", lora_dir=str(lora_dir))
    engine._client = httpx.AsyncClient(base_url="http://vllm", transport=httpx.MockTransport(server))
    return engine


def test_with_a_resolver_folder_the_engine_places_adapters_and_never_loads_through_the_api(tmp_path):
    source = _adapter(tmp_path / "artifact")
    shared = tmp_path / "shared"
    shared.mkdir()
    server = FakeServer()
    engine = _engine(server, shared)

    async def run() -> None:
        await engine.connect()
        await engine.load_adapter(LoRASpec("fr-1-v1", str(source)))
        assert json.loads((shared / "fr-1-v1" / CONFIG).read_text())["base_model_name_or_path"] == "/models/SmolLM2"
        await engine.unload_adapters("fr-1")  # a failed activation on this replica: others may serve from it
        assert (shared / "fr-1-v1").exists()
        await engine.load_adapter(LoRASpec("fr-1-v1", str(source)))
        await engine.delete_adapters("fr-1")  # the request left the registry
        assert not (shared / "fr-1-v1").exists()  # no server resolves it again
        with pytest.raises(EngineError, match="removed"):  # nor is it placed again by a late generation
            await engine.load_adapter(LoRASpec("fr-1-v1", str(source)))
        assert not (shared / "fr-1-v1").exists()

    asyncio.run(run())
    assert "/v1/load_lora_adapter" not in server.calls and "/v1/completions" in server.calls


def test_a_server_that_cannot_resolve_the_adapter_fails_its_activation(tmp_path):
    source = _adapter(tmp_path / "artifact")
    shared = tmp_path / "shared"
    shared.mkdir()
    engine = _engine(FakeServer(resolves=False), shared)

    async def run() -> None:
        await engine.connect()
        with pytest.raises(EngineError, match="VLLM_LORA_RESOLVER_CACHE_DIR"):
            await engine.load_adapter(LoRASpec("fr-1-v1", str(source)))
        assert not engine.holds_adapter("fr-1-v1")

    asyncio.run(run())
