"""How a request becomes text and tokens: one set of functions for the server, the detector and training.

The text the detector scores, the token ids the engine gets and the prompts the training jobs learn
on all come from here, so "what was tuned is what is served" holds by construction. Chat prompts are
rendered with the tokenizer's chat template (generation prompt included) and tokenised without
adding special tokens (the template has them); completion prompts get the tokenizer's defaults,
exactly as vLLM's own OpenAI server does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Message = dict[str, str]

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>")


def user_messages(question: str) -> list[Message]:
    """A one-turn chat asking `question`."""
    return [{"role": "user", "content": question}]


def render_chat(tokenizer: Any, messages: Sequence[Message]) -> str:
    """The exact prompt text of a chat, generation prompt included."""
    if not getattr(tokenizer, "chat_template", None):  # a base model: plain turns
        return "\n".join(m.get("content") or "" for m in messages) + "\n"
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def render(tokenizer: Any, messages: Sequence[Message] | None = None, prompt: str | None = None) -> str:
    """The text the model continues: the rendered chat, or the completion prompt as given."""
    if messages is not None:
        return render_chat(tokenizer, messages)
    return prompt or ""


def adds_special_tokens(messages: Sequence[Message] | None) -> bool:
    """Chat prompts carry their special tokens in the template; completion prompts get the defaults."""
    return messages is None


def prompt_ids(tokenizer: Any, messages: Sequence[Message] | None = None, prompt: str | None = None) -> list[int]:
    """Token ids the engine gets for a chat or completion prompt."""
    text = render(tokenizer, messages, prompt)
    return list(tokenizer.encode(text, add_special_tokens=adds_special_tokens(messages)))


def chat_prompt_ids(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    return prompt_ids(tokenizer, messages=messages)


def encode_with_offsets(tokenizer: Any, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` as `prompt_ids` makes them, with each token's character offsets."""
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes the assistant's turn (`<|im_end|>` for SmolLM2): what training appends to
    answers and what generation stops on."""
    for candidate in END_OF_TURN_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(candidate)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            return token_id
    return int(tokenizer.eos_token_id)


def stop_ids(tokenizer: Any) -> list[int]:
    """Every token that ends a greedy generation: the end of turn and the end of sequence."""
    ids = {end_of_turn_id(tokenizer)}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


# -- what the detector sees ------------------------------------------------------------------------


def message_texts(message: Message) -> list[str]:
    """Every text of one message the model may see: its `name`, its content and its tool calls."""
    texts = [str(message["name"])] if message.get("name") else []
    texts.append(message.get("content") or "")
    texts += [str(call) for call in message.get("tool_calls") or []]
    return texts


def detector_texts(
    messages: Sequence[Message] | None = None, prompt: str | None = None, continuation: str | None = None
) -> list[str]:
    """Every text the model sees, in order: each message of a chat (every role, every earlier turn,
    names and tool calls too), or the completion prompt; then a scored continuation."""
    texts = [t for m in messages for t in message_texts(m)] if messages is not None else [prompt or ""]
    return texts + ([continuation] if continuation else [])


def detector_text(
    messages: Sequence[Message] | None = None, prompt: str | None = None, continuation: str | None = None
) -> str:
    """The text the detector scores: `detector_texts` joined by newlines (ECO maps spans through this)."""
    return "\n".join(detector_texts(messages, prompt, continuation))
