"""OpenAI's published response schemas (an extract of openai/openai-openapi, kept outside the repo like
the TOFU data) and a validator for what the server sends."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

ENV = "UNLEARND_OPENAI_SCHEMAS"


def openai_schemas_path() -> Path:
    """`$UNLEARND_OPENAI_SCHEMAS`, else `<repo parent>/shared/openai/response_schemas.json`."""
    override = os.environ.get(ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "shared" / "openai" / "response_schemas.json"


class OpenAISchemas:
    """Validates a JSON body against one of the extract's `components.schemas` (JSON Schema 2020-12:
    the extract rewrote OpenAPI's `nullable` as `anyOf [..., null]`)."""

    def __init__(self, components: dict[str, Any], origin: str = ""):
        from jsonschema import Draft202012Validator

        self.components, self.origin = components, origin
        self._validators: dict[str, Draft202012Validator] = {}
        # OpenAI's API sends `finish_reason: null` in a streamed completion's chunks until the choice
        # ends, but the published completion object (which says it is also the streamed chunk) has no
        # null there (openai/openai-openapi#100 asked for it; the document still has none): streamed
        # completion chunks are read against the object with that one field nullable, the rest as published.
        streamed = copy.deepcopy(components)
        choice = streamed["schemas"]["CreateCompletionResponse"]["properties"]["choices"]["items"]
        choice["properties"]["finish_reason"] = {"anyOf": [choice["properties"]["finish_reason"], {"type": "null"}]}
        self._streamed_components = streamed

    @classmethod
    def load(cls, path: Path) -> OpenAISchemas:
        document = json.loads(path.read_text())
        return cls(document["components"], str(document.get("source", path)))

    def errors(self, instance: Any, name: str, streamed_completion: bool = False) -> list[str]:
        """Every way `instance` breaks schema `name`, as 'path: message' lines (empty: it conforms)."""
        from jsonschema import Draft202012Validator

        key = f"{name}/streamed" if streamed_completion else name
        if key not in self._validators:
            components = self._streamed_components if streamed_completion else self.components
            if name not in components["schemas"]:
                raise KeyError(f"no schema {name!r} in the OpenAI extract")
            schema = {"components": components, "$ref": f"#/components/schemas/{name}"}
            Draft202012Validator.check_schema(schema)
            self._validators[key] = Draft202012Validator(schema)
        found = sorted(self._validators[key].iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
        return [_describe(e) for e in found]

    def check(self, instance: Any, name: str, streamed_completion: bool = False) -> None:
        errors = self.errors(instance, name, streamed_completion)
        if errors:
            shown = json.dumps(instance)[:2000]
            raise AssertionError(f"not a valid OpenAI {name} ({self.origin}):\n  " + "\n  ".join(errors) + f"\n{shown}")


def _describe(error) -> str:
    """'path: message', for an `anyOf` (OpenAPI's nullable) the branch that came closest."""
    from jsonschema.exceptions import best_match

    if error.context:  # the null branch's "is not of type 'null'" says nothing
        error = best_match([e for e in error.context if e.validator_value != "null"] or error.context)
    message = error.message if len(error.message) <= 300 else error.message[:300] + "..."
    return f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {message}"


def load_openai_schemas() -> OpenAISchemas:
    """The extract, or a test failure that says where it was looked for."""
    import pytest

    path = openai_schemas_path()
    if not path.is_file():
        pytest.fail(
            f"OpenAI response schemas not found at {path} (the extract of openai/openai-openapi's response "
            f"components; set {ENV} to its response_schemas.json)"
        )
    return OpenAISchemas.load(path)
