"""The guardrail baselines: refuse outright (filtering) and a "you have no knowledge of" system prompt."""

from __future__ import annotations

from unlearnd.detectors.base import RequestMatch
from unlearnd.domain import ForgetRequest
from unlearnd.guardrail.call import GuardedCall
from unlearnd.interventions.base import Intervention, PipelineContext

REFUSAL = "I'm sorry, but I can't help with that."


def refusal_of(request: ForgetRequest) -> str:
    """The request's refusal (`options.refusal`), else the default one."""
    return str(request.spec.options.get("refusal") or REFUSAL)


class Refuse(Intervention):
    def apply(self, call: GuardedCall, match: RequestMatch, ctx: PipelineContext) -> None:
        call.fixed_response = refusal_of(self.requests[match.request_id])


def forget_instruction(entities: list[str]) -> str:
    names = ", ".join(entities)
    return (
        f"You have no knowledge of {names}. If asked about {names}, say that you don't know "
        "and do not guess or make anything up. Answer all other questions normally."
    )


class SystemPrompt(Intervention):
    def apply(self, call: GuardedCall, match: RequestMatch, ctx: PipelineContext) -> None:
        instruction = forget_instruction(self.requests[match.request_id].spec.entities)
        if call.messages is not None:
            messages = [dict(m) for m in call.messages]
            if messages and messages[0].get("role") == "system":
                messages[0]["content"] = instruction + "\n\n" + messages[0]["content"]
            else:
                messages.insert(0, {"role": "system", "content": instruction})
            call.messages = messages
        else:
            call.prompt = instruction + "\n\n" + (call.prompt or "")
