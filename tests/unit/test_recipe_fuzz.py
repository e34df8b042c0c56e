"""The recipe as untrusted input: mutated recipes, raw bytes and random text are either accepted or refused with
one line naming a field or file (a ``QtoolError``, exit code 2 in the CLI) — never a traceback, a hang or a file
written. And no value of the wrong type is coerced (``n_samples: true`` used to become 1).

CI runs a fixed, derandomized budget; ``-m slow`` runs ≥ 1,000 structured mutations plus the byte and text fuzzers
and a sample through the CLI.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qtool.errors import QtoolError
from qtool.recipe import load_recipe
from qtool.validation import validate_fit
from tests.conftest import ROOT, STORIES, STORIES_RECIPE, TINYSTORIES, localize

pytestmark = pytest.mark.skipif(not (STORIES / "config.json").is_file(), reason="stories260K asset absent")

BASE = localize(yaml.safe_load(STORIES_RECIPE.read_text()))


def _leaves(node, prefix=()) -> list[tuple]:
    """Every key path of the resolved recipe (sections, nested mappings and leaves)."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((*prefix, k))
            out += _leaves(v, (*prefix, k))
    return out


RESOLVED = load_recipe(STORIES_RECIPE.parent / STORIES_RECIPE.name).model_dump(mode="json") if STORIES.exists() else {}
PATHS = sorted(set(_leaves(RESOLVED)) | {("scheme", "preset"), ("model",), ("extra",), ("quantize", "method")})
ODD = ["W4A16", "W4A4KV4", "gptq", "rtn", "hadamard", "ostquant", "stats", "re:.*", "re:((", "q_proj", "down_prj",
       "/nonexistent", "../x", "/", "", "-1", "1e400", "nan", str(TINYSTORIES), str(STORIES), "channel",
       "group"]  # fmt: skip
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(ODD),
    st.lists(st.one_of(st.integers(-3, 300), st.sampled_from(ODD)), max_size=3),
    st.dictionaries(st.sampled_from(["method", "bits", "x", "preset"]), st.sampled_from([4, "gptq", None]), max_size=2),
)
MUTATION = st.tuples(st.sampled_from(["set", "delete", "unknown"]), st.sampled_from(PATHS), VALUES)


def _mutate(raw: dict, mutations) -> dict:
    raw = copy.deepcopy(raw)
    for kind, path, value in mutations:
        node = raw
        for key in path[:-1]:
            child = node.get(key) if isinstance(node, dict) else None
            if not isinstance(child, dict):
                child = {}
                if isinstance(node, dict):
                    node[key] = child
            node = child
        if kind == "set":
            node[path[-1]] = value
        elif kind == "delete":
            node.pop(path[-1], None)
        else:
            node[f"{path[-1]}_typo"] = value
    return raw


def _check(path: Path, run_dir: Path) -> str:
    """``accepted`` or the refusal; anything but a one-line ``QtoolError`` fails the test."""
    try:
        recipe = load_recipe(path)
        validate_fit(recipe, run_dir)
    except QtoolError as e:
        message = str(e)
        assert message and "\n" not in message and ":" in message, message
        return message
    finally:
        assert not run_dir.exists(), "validation wrote the run directory"
    return "accepted"


def _structured(mutations) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        raw = _mutate(BASE, mutations)
        path = Path(tmp) / "r.yaml"
        path.write_text(yaml.safe_dump(raw, allow_unicode=True))
        return _check(path, Path(tmp) / "run")


FAST = settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
LONG = settings(max_examples=1000, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))


@FAST
@given(st.lists(MUTATION, min_size=1, max_size=4))
def test_mutated_recipes_are_accepted_or_refused_in_one_line(mutations):
    _structured(mutations)


@FAST
@given(st.one_of(st.binary(max_size=400), st.text(max_size=400).map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_bytes_and_text_are_refused_in_one_line(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_bytes(data)
        assert _check(path, Path(tmp) / "run") != "accepted"  # never a recipe: no model, no calibration


def _wrong_types() -> list[tuple[tuple, object]]:
    """For every scalar field of the resolved recipe, values of another YAML type that used to be coerced."""
    cases = []
    for path in _leaves(RESOLVED):
        value = RESOLVED
        for key in path:
            value = value[key]
        if isinstance(value, bool):
            cases += [(path, 1), (path, "yes")]
        elif isinstance(value, int):
            cases += [(path, True), (path, str(value)), (path, value + 0.5)]
        elif isinstance(value, float):
            cases += [(path, True), (path, str(value))]
        elif isinstance(value, str):
            cases += [(path, 5)]
    return cases


@pytest.mark.parametrize(
    ("path", "value"), _wrong_types(), ids=lambda x: ".".join(x) if isinstance(x, tuple) else repr(x)
)
def test_a_value_of_the_wrong_type_is_refused(path, value):
    with tempfile.TemporaryDirectory() as tmp:
        raw = _mutate(RESOLVED, [("set", path, value)])
        p = Path(tmp) / "r.yaml"
        p.write_text(yaml.safe_dump(raw))
        assert _check(p, Path(tmp) / "run") != "accepted", (path, value)


def test_listed_silent_acceptances_are_refused(tmp_path):
    """The kinds issue 20 found accepted without a word: a duplicate key, ``version: true``, an ignore pattern that
    matches nothing, a model directory without weights."""
    text = yaml.safe_dump(BASE)
    cases = {
        "duplicate key": text + "name: twice\n",
        "version true": text.replace("version: 1", "version: true"),
        "unmatched ignore": yaml.safe_dump({**BASE, "scheme": {**BASE["scheme"], "ignore": ["down_prj"]}}),
    }
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_bytes((STORIES / "config.json").read_bytes())
    cases["model without weights"] = yaml.safe_dump({**BASE, "model": str(empty)})
    for name, content in cases.items():
        path = tmp_path / f"{name.replace(' ', '-')}.yaml"
        path.write_text(content)
        assert _check(path, tmp_path / "run") != "accepted", name


@pytest.mark.slow
@LONG
@given(st.lists(MUTATION, min_size=1, max_size=6))
def test_fuzz_long(mutations):
    _structured(mutations)


@pytest.mark.slow
@settings(max_examples=40, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(MUTATION, min_size=1, max_size=4))
def test_fuzz_through_the_cli(mutations):
    """Refusals through ``qtool validate``: exit code 2 and one line on stderr, never a traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_text(yaml.safe_dump(_mutate(BASE, mutations), allow_unicode=True))
        proc = subprocess.run([sys.executable, "-m", "qtool", "validate", str(path)], capture_output=True, text=True,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)  # fmt: skip
        assert "Traceback" not in proc.stderr
        if proc.returncode:
            assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
