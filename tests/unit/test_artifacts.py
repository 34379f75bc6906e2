"""Folders are swapped in whole: the target always holds the old files or the new ones."""

from __future__ import annotations

import pytest

from unlearnd import artifacts
from unlearnd.artifacts import exchange_paths, install_dir


def _folder(path, text):
    path.mkdir()
    (path / "adapter_model.safetensors").write_text(text)
    return path


def test_a_new_folder_replaces_the_old_one_without_a_moment_with_neither(tmp_path, monkeypatch):
    probe_a, probe_b = _folder(tmp_path / "a", "a"), _folder(tmp_path / "b", "b")
    if not exchange_paths(probe_a, probe_b):
        pytest.skip("this file system cannot swap two paths in one step")
    assert (probe_a / "adapter_model.safetensors").read_text() == "b"

    target = _folder(tmp_path / "lora", "old")
    moves = []
    real_replace = artifacts.os.replace
    monkeypatch.setattr(artifacts.os, "replace", lambda src, dst: (moves.append((src, dst)), real_replace(src, dst)))
    install_dir(_folder(tmp_path / ".lora.staging", "new"), target)
    assert (target / "adapter_model.safetensors").read_text() == "new"
    assert moves == []  # the old folder was never moved away before the new one stood in its place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "lora"]  # staging and old copy removed


def test_a_folder_is_installed_where_there_was_none(tmp_path):
    target = tmp_path / "lora"
    install_dir(_folder(tmp_path / ".lora.staging", "new"), target)
    assert (target / "adapter_model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]
