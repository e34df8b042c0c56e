"""Atomic stage directories and hash verification."""

from __future__ import annotations

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
    w = StageWriter(final, "old")
    (w.path / "stale.bin").write_bytes(b"x")
    w2 = StageWriter(final, "new")
    assert not (w2.path / "stale.bin").exists()
    (w2.path / "keep.bin").write_bytes(b"y")
    assert (StageWriter(final, "new").path / "keep.bin").exists()  # same fingerprint: partial work is kept
