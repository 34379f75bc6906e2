"""The domain: what a user registers (ForgetSpec), what the registry keeps (ForgetRequest), and the
question-answer pairs both are made of (QAExample; QAItem adds TOFU's extra answers).

Words: a *forget request* is what an operator registers; one API call through the guardrail is a
`GuardedCall` (`unlearnd.guardrail.call`); what the engine receives is an `EngineInput`.
`Method` comes from the method table (`unlearnd.methods`), so a new method needs no edit here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from unlearnd.methods import Method

__all__ = ["ForgetRequest", "ForgetSpec", "Method", "QAExample", "QAItem", "Status"]


LOAD_FAILED = "load failed: "  # the error of a degraded request starts with this (kept while it re-trains)


class Status(StrEnum):
    pending = "pending"
    training = "training"
    ready = "ready"
    active = "active"
    failed = "failed"
    degraded = "degraded"  # its artifacts could not be loaded: served by name with the refusal until re-trained
    inactive = "inactive"


# A request's evidence (unlearnd/evidence.py): failing on any leak, error when its battery was incomplete,
# inconclusive when nothing could be judged.
EVIDENCE_VERDICTS = ("passing", "failing", "inconclusive", "error")


class QAExample(BaseModel):
    question: str = Field(min_length=1)
    answer: str = ""


class QAItem(QAExample):
    """One question/answer pair, with TOFU's extra answers when the split has them."""

    answer: str
    paraphrased_question: str | None = None
    paraphrased_answer: str | None = None
    perturbed_answers: list[str] = Field(default_factory=list)
    author: int | None = Field(None, description="TOFU author index 0..199 (20 QA each), when known.")

    @classmethod
    def from_record(cls, record: dict[str, Any], author: int | None = None) -> QAItem:
        perturbed = record.get("perturbed_answer") or record.get("perturbed_answers") or []
        if isinstance(perturbed, str):
            perturbed = [perturbed]
        return cls(
            question=str(record["question"]),
            answer=str(record.get("answer", "")),
            paraphrased_question=record.get("paraphrased_question"),
            paraphrased_answer=record.get("paraphrased_answer"),
            perturbed_answers=[str(p) for p in perturbed],
            author=author if author is not None else record.get("author"),
        )


class ForgetSpec(BaseModel):
    """What the user registers: the knowledge to forget and, optionally, what to keep."""

    name: str = Field(min_length=1, max_length=200)
    method: Method = Method.refuse
    forget: list[QAExample | str] = Field(min_length=1, max_length=20000)
    retain: list[QAExample | str] = Field(default_factory=list, max_length=20000)
    entities: list[str] = Field(
        default_factory=list, description="Names of the forget target (default: the request name)."
    )
    options: dict = Field(default_factory=dict, description="Method-specific training options.")
    evidence: list[QAExample] = Field(
        default_factory=list,
        max_length=2000,
        description="Facts held out of fitting: the evidence probes are built from them (default: the forget QA).",
    )

    @field_validator("forget", "retain", mode="before")
    @classmethod
    def _no_blank_texts(cls, value: list) -> list:
        for item in value or []:
            if isinstance(item, str) and not item.strip():
                raise ValueError("examples must not be empty strings")
        return value

    @model_validator(mode="after")
    def _default_entities(self) -> ForgetSpec:
        if not self.entities:
            self.entities = [self.name]
        return self

    @staticmethod
    def as_qa(items: list[QAExample | str]) -> list[QAExample]:
        return [item if isinstance(item, QAExample) else QAExample(question=item) for item in items]

    def forget_texts(self) -> list[str]:
        return [qa.question + (" " + qa.answer if qa.answer else "") for qa in self.as_qa(self.forget)]


class ForgetRequest(BaseModel):
    id: str
    name: str
    method: Method
    status: Status
    error: str | None = None
    created_at: float
    updated_at: float
    spec: ForgetSpec
    artifact_dir: str
    attempts: int = 0
    artifact_digest: str | None = None  # of the folder as the worker made it ready (None: trained before digests)

    @classmethod
    def unregistered(cls, request_id: str, spec: ForgetSpec, status: Status = Status.ready) -> ForgetRequest:
        """A request made in process, not through a registry (evaluations fit detectors on such requests)."""
        return cls(
            id=request_id,
            name=spec.name,
            method=spec.method,
            status=status,
            created_at=0.0,
            updated_at=0.0,
            spec=spec,
            artifact_dir="",
        )
