"""Atomic stage directories and hash verification."""

from __future__ import annotations

import json

import pytest
import torch

from qtool.artifacts import StageWriter, load_tensors, read_manifest, save_tensors, verify
from qtool.errors import ArtifactError


def test_commit_is_atomic_and_verifiable(tmp_path):
    final = tmp_path / "04-quantize"
    w = StageWriter(final, "fp1")
    save_tensors(w.path / "layers" / "000.safetensors", {"q": torch.arange(6, dtype=torch.int8)})
    assert read_manifest(final) is None and not final.exists()  # nothing visible before commit
    manifest = w.commit({"summary": {}})
    assert not w.path.exists() and read_manifest(final)["fingerprint"] == "fp1"
    assert list(manifest["files"]) == ["layers/000.safetensors"]
    verify(final, manifest)
    (final / "layers" / "000.safetensors").write_bytes(b"truncated")
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        verify(final, manifest)
    with pytest.raises(ArtifactError, match="unreadable"):
        load_tensors(final / "layers" / "000.safetensors")


def test_leftovers_of_another_fingerprint_are_discarded(tmp_path):
    final = tmp_path / "04-quantize"
    w = StageWriter(final, "old", resumable=True)
    (w.path / "stale.bin").write_bytes(b"x")
    w2 = StageWriter(final, "new", resumable=True)
    assert not (w2.path / "stale.bin").exists()
    (w2.path / "keep.bin").write_bytes(b"y")
    assert (StageWriter(final, "new", resumable=True).path / "keep.bin").exists()  # same config: partial work kept
    assert not (StageWriter(final, "new").path / "keep.bin").exists()  # a stage that does not resume starts empty


def test_a_kill_inside_commit_keeps_the_partial_work(tmp_path):
    """The manifest is written while the marker still exists; a kill after the marker is gone and before the
    directory moves leaves a manifest naming the fingerprint, and the partial work is reused (issue 20)."""
    final = tmp_path / "04-quantize"
    w = StageWriter(final, "fp", resumable=True)
    (w.path / "layers").mkdir()
    (w.path / "layers" / "000.safetensors").write_bytes(b"layer")
    (w.path / "manifest.json").write_text(json.dumps({"fingerprint": "fp"}))
    (w.path / ".fingerprint").unlink()  # the instant before os.replace
    assert (StageWriter(final, "fp", resumable=True).path / "layers" / "000.safetensors").is_file()
    (w.path / ".fingerprint").unlink()
    assert not (StageWriter(final, "other", resumable=True).path / "layers").exists()


def test_strays_of_killed_writes_never_reach_a_commit_and_extra_files_are_caught(tmp_path):
    final = tmp_path / "05-pack"
    w = StageWriter(final, "fp", resumable=True)
    (w.path / "model").mkdir()
    (w.path / "model" / "model.safetensors").write_bytes(b"weights")
    (w.path / "model" / ".tmpa1b2c3").write_bytes(b"half a copy")  # safetensors' own temp file, killed mid-write
    (w.path / "model" / "config.json.part").write_text("{")
    manifest = w.commit({})
    assert sorted(manifest["files"]) == ["model/model.safetensors"]
    assert sorted(p.name for p in (final / "model").iterdir()) == ["model.safetensors"]
    verify(final, manifest)
    (final / "model" / "extra.bin").write_bytes(b"added later")
    with pytest.raises(ArtifactError, match="not part of the stage"):
        verify(final, manifest)
