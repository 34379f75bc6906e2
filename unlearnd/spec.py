"""Domain types: what a user registers (ForgetSpec) and what the registry keeps (ForgetRequest).

`Method` comes from the method table (`unlearnd.methods`), so a new method needs no edit here.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field, field_validator, model_validator

from unlearnd.methods import Method

__all__ = ["ForgetRequest", "ForgetSpec", "Method", "QAExample", "Status"]


LOAD_FAILED = "load failed: "  # the error of a degraded request starts with this (kept while it re-trains)


class Status(StrEnum):
    pending = "pending"
    training = "training"
    ready = "ready"
    active = "active"
    failed = "failed"
    degraded = "degraded"  # its artifacts could not be loaded: served by name with the refusal until re-trained
    inactive = "inactive"


class QAExample(BaseModel):
    question: str = Field(min_length=1)
    answer: str = ""


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
