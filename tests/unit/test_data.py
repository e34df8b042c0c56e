"""Text loading in the pinned formats, spans and seeded windows."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from qtool.data import load_text, sample_windows
from qtool.errors import QtoolError
from tests.conftest import WIKI_TEST, require


def test_wikitext_rows_are_rebuilt_as_hf_rows(tmp_path):
    p = tmp_path / "wiki.test.raw"
    p.write_text(" \n = Title = \n \n Some text . \n")
    assert load_text(p) == "\n\n = Title = \n\n\n\n\n Some text . \n"
    assert load_text(p, "raw") == p.read_text()


def test_real_wikitext_test_length():
    require(WIKI_TEST)
    text = load_text(WIKI_TEST)
    assert text.startswith("\n\n = Robert Boulter = \n") and len(text) == 1_294_336  # 4,358 rows joined


def test_jsonl_and_span(tmp_path):
    p = tmp_path / "docs.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write(json.dumps({"text": "alpha"}) + "\n" + json.dumps({"text": "beta"}) + "\n")
    assert load_text(p) == "alpha\n\nbeta"
    assert load_text(p, span=(0.0, 0.5)) == "alpha"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": 1}\n')
    with pytest.raises(QtoolError, match="line 1 has no 'text' field"):
        load_text(bad, field="calibration.dataset")


def test_windows_are_seeded_and_in_range():
    ids = torch.arange(1000)
    a = sample_windows(ids, 4, 100, torch.Generator().manual_seed(3))
    b = sample_windows(ids, 4, 100, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (4, 100)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 99, dtype=torch.int64))
    with pytest.raises(QtoolError, match="calibration.seqlen"):
        sample_windows(ids, 1, 2000, torch.Generator())
