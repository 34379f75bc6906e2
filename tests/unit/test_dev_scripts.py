"""The dev checks in scripts/ import private helpers of the package (`facts._role`, the output guard
evaluation's `_stream`): a rename there must fail here, not the next time somebody runs a dev check."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.mark.parametrize("path", sorted(SCRIPTS.glob("dev_*.py")), ids=lambda p: p.stem)
def test_every_dev_check_imports_and_says_how_to_run_it(path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(SCRIPTS))  # the scripts import their shared `dev_check` from their folder
    spec = importlib.util.spec_from_file_location(f"dev_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    if path.stem != "dev_check":  # the shared helpers, not a check of its own
        assert callable(module.main)
        assert "Usage:" in (module.__doc__ or "")
