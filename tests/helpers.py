"""Test doubles shared by unit tests: a tiny random-init Llama behind the real `Engine` interface."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import torch

from unlearnd.domain import ForgetRequest, ForgetSpec, QAExample
from unlearnd.engine.base import (
    ChoiceDelta,
    EmbeddingTable,
    Engine,
    EngineInput,
    TokenLogprob,
)
from unlearnd.server.settings import ServerSettings

ADMIN_KEY = "admin-secret"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def app_settings(data_dir: str | Path, **overrides) -> ServerSettings:
    """Settings for an app under test: a known admin key, no worker process (tests run the worker code
    themselves), the keyword detector, a fast registry sync."""
    defaults = {"admin_key": ADMIN_KEY, "start_worker": False, "detector": "keyword", "sync_interval_s": 0.05}
    return ServerSettings(data_dir=data_dir, **{**defaults, **overrides})


def tiny_llama(vocab_size: int, seed: int = 0, **config_overrides):
    """A random-init 2-layer Llama of width 32 (seeded); `config_overrides` go into its LlamaConfig."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab_size,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        **config_overrides,
    }
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


class TinyEngine(Engine):
    """Greedy/sampled decoding with a tiny HF Llama: real tokenizer, real embeddings, no vLLM."""

    def __init__(
        self,
        tokenizer_dir: str | Path,
        model_name: str = "tiny",
        max_model_len: int = 256,
        eos_token_id: int | None = None,
    ):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.model = tiny_llama(len(self.tokenizer))
        self.embeddings = EmbeddingTable(self.model.get_input_embeddings().weight.detach().clone())
        self.model_config = self.model.config.to_dict()
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.eos_token_id = eos_token_id if eos_token_id is not None else self.tokenizer.eos_token_id
        self.seen: list[EngineInput] = []

    async def start(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None

    async def prompt_logprobs(self, request: EngineInput) -> list[float | None]:
        self.seen.append(request)
        with torch.no_grad():
            embeds = self.prompt_embeds_for(request).to(torch.float32).unsqueeze(0)
            logprobs = torch.log_softmax(self.model(inputs_embeds=embeds).logits[0], -1)
        ids = request.prompt_token_ids
        return [None] + [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]

    async def generate(self, request: EngineInput) -> AsyncIterator[ChoiceDelta]:
        self.seen.append(request)
        torch.set_grad_enabled(False)
        s = request.sampling
        for index in range(s.n):
            generator = torch.Generator().manual_seed((s.seed or 0) + index)
            embeds = self.prompt_embeds_for(request).to(torch.float32).unsqueeze(0)
            text_so_far = ""
            for step in range(s.max_tokens):
                logits = self.model(inputs_embeds=embeds).logits[0, -1]
                logprobs = torch.log_softmax(logits, -1)
                if s.temperature == 0:
                    token = int(torch.argmax(logits))
                else:
                    probs = torch.softmax(logits / s.temperature, -1)
                    token = int(torch.multinomial(probs, 1, generator=generator))
                text = self.tokenizer.decode([token])
                finish = None
                if token == self.eos_token_id:
                    finish, text = "stop", ""
                elif step == s.max_tokens - 1:
                    finish = "length"
                text_so_far += text
                if any(stop in text_so_far for stop in s.stop):
                    finish = "stop"
                lp = None
                if s.logprobs is not None:
                    top = torch.topk(logprobs, max(s.logprobs, 1))
                    lp = [
                        TokenLogprob(
                            token=self.tokenizer.decode([token]),
                            logprob=float(logprobs[token]),
                            top_logprobs={
                                self.tokenizer.decode([int(i)]): float(v) for v, i in zip(top.values, top.indices)
                            },
                        )
                    ]
                yield ChoiceDelta(index=index, text=text, token_ids=[token], logprobs=lp, finish_reason=finish)
                await asyncio.sleep(0)
                if finish:
                    break
                next_embed = self.model.get_input_embeddings()(torch.tensor([[token]]))
                embeds = torch.cat([embeds, next_embed], dim=1)


def make_random_lora(
    model_dir: str | Path, out_dir: str | Path, seed: int = 0, std: float = 0.2, rank: int = 8
) -> Path:
    """A random-init PEFT LoRA on the real model (attention projections only), strong enough to change outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    peft_model = get_peft_model(
        model,
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False),
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, std)
    peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)


def forget_request(
    rid: str, name: str, qa: list[tuple[str, str]], entities: list[str], method: str = "refuse"
) -> ForgetRequest:
    """A ready forget request over (question, answer) pairs, for detector tests."""
    spec = ForgetSpec(name=name, forget=[QAExample(question=q, answer=a) for q, a in qa], entities=entities)
    return ForgetRequest(
        id=rid, name=name, method=method, status="ready", created_at=0.0, updated_at=0.0, spec=spec, artifact_dir=""
    )


class ScriptedEngine(TinyEngine):
    """The tiny engine's tokenizer and embeddings, but every generation says `script` (one delta per
    word, with log-probs when asked): what the output guard sees, whatever the prompt."""

    def __init__(self, tokenizer_dir: str | Path, script: str, **kwargs):
        super().__init__(tokenizer_dir, **kwargs)
        self.script = script
        self.aborted: list[str] = []

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def generate(self, request: EngineInput) -> AsyncIterator[ChoiceDelta]:
        self.seen.append(request)
        words = self.script.split(" ")
        for index in range(request.sampling.n):
            for i, word in enumerate(words):
                text = word if i == 0 else " " + word
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                lp = None
                if request.sampling.logprobs is not None:
                    lp = [TokenLogprob(token=text, logprob=-0.5, top_logprobs={text: -0.5})]
                last = i == len(words) - 1
                yield ChoiceDelta(
                    index=index, text=text, token_ids=ids, logprobs=lp, finish_reason="stop" if last else None
                )
                await asyncio.sleep(0)


def register_active(client, data_dir, body: dict, admin_key: str = ADMIN_KEY, detector: str = "keyword") -> str:
    """POST a forget request through the admin API, train it with the real worker code (once), and wait
    until this server serves it (another server on the same data dir may mark it active first); returns
    its id."""
    import time

    from unlearnd.jobs.worker import run_worker

    headers = {"Authorization": f"Bearer {admin_key}"}
    request_id = client.post("/v1/unlearning/requests", headers=headers, json=body).json()["id"]
    run_worker(data_dir, detector, "unused", once=True)
    deadline = time.time() + 5
    pipeline = client.app.state.unlearnd.pipeline
    while (
        client.get(f"/v1/unlearning/requests/{request_id}", headers=headers).json()["status"] != "active"
        or request_id not in pipeline.active
        or request_id in pipeline.degraded  # refused by name until its own artifacts serve it
    ):
        assert time.time() < deadline, f"{request_id} did not become active"
        time.sleep(0.05)
    return request_id
