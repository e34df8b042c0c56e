"""The evaluation task registry: task name → local data file(s), lm-eval YAML, metrics — and the adapters that turn
the local files into the documents lm-eval's own task definitions expect.

Zero-shot tasks run through lm-evaluation-harness with the YAMLs in ``configs/tasks/``. Each YAML copies the prompt
(``doc_to_text``/``doc_to_target``/``doc_to_choice``) of lm-eval's task of the same name and replaces the hub
download with ``custom_dataset: !function qtool.eval.tasks.load_local``, which reads the local files (the data
directory reaches it through lm-eval's task ``metadata``). Perplexity tasks use qtool's pinned token perplexity.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from qtool.errors import QtoolError

log = logging.getLogger(__name__)

DATA_DIR_ENV = "QTOOL_DATA_DIR"
TASKS_DIR = Path(__file__).resolve().parents[2] / "configs" / "tasks"


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task. ``files`` are relative to the data directory; ``kind`` is ``lm_eval`` or ``perplexity``."""

    kind: str
    files: tuple[str, ...]
    metrics: tuple[str, ...]
    yaml: str | None = None  # lm-eval tasks: file in configs/tasks/, defining task ``qtool_<stem>``
    split: str | None = None  # the split lm-eval evaluates (the YAML's validation_split/test_split)
    text_format: str | None = None  # perplexity: the qtool.data.load_text format
    note: str = ""

    @property
    def lm_eval_task(self) -> str | None:
        return f"qtool_{Path(self.yaml).stem}" if self.yaml else None


TASKS: dict[str, TaskSpec] = {
    "wikitext2": TaskSpec(
        kind="perplexity",
        files=("wikitext-2-raw-v1/wiki.test.raw",),
        metrics=("token_ppl",),
        text_format="wikitext",
        note="WikiText-2 raw test, token perplexity (architecture.md §7), not lm-eval's word perplexity",
    ),
    "tinystories": TaskSpec(
        kind="perplexity",
        files=("tinystories/tinystories_validation_first4301.txt",),
        metrics=("token_ppl",),
        text_format="raw",
        note="first 4,301 TinyStories validation stories, token perplexity (for tiny test models)",
    ),
    "piqa": TaskSpec(
        kind="lm_eval",
        files=("piqa/valid.jsonl", "piqa/valid-labels.lst"),
        metrics=("acc", "acc_norm"),
        yaml="piqa.yaml",
        split="validation",
        note="PIQA validation, 1,838 items",
    ),
    "arc_easy": TaskSpec(
        kind="lm_eval",
        files=("arc_easy/test.jsonl",),
        metrics=("acc", "acc_norm"),
        yaml="arc_easy.yaml",
        split="test",
        note="ARC-Easy test, 2,376 items",
    ),
    "arc_challenge": TaskSpec(
        kind="lm_eval",
        files=("arc_challenge/test.jsonl",),
        metrics=("acc", "acc_norm"),
        yaml="arc_challenge.yaml",
        split="test",
        note="ARC-Challenge test, 1,172 items",
    ),
    "winogrande": TaskSpec(
        kind="lm_eval",
        files=("winogrande/dev.jsonl",),
        metrics=("acc",),
        yaml="winogrande.yaml",
        split="validation",
        note="WinoGrande (xl) validation, 1,267 items",
    ),
    "hellaswag": TaskSpec(
        kind="lm_eval",
        files=("hellaswag/validation.olmes-subset1000.jsonl",),
        metrics=("acc", "acc_norm"),
        yaml="hellaswag.yaml",
        split="validation",
        note="HellaSwag validation, a 1,000-item subset (OLMES, seed 1234) of 10,042",
    ),
    "lambada": TaskSpec(
        kind="lm_eval",
        files=("lambada_openai/lambada_test.jsonl",),
        metrics=("acc", "perplexity"),
        yaml="lambada_openai.yaml",
        split="test",
        note="LAMBADA (OpenAI) test, 5,153 items; perplexity of the last word, lm-eval's definition",
    ),
    "boolq": TaskSpec(
        kind="lm_eval",
        files=("boolq/validation.jsonl",),
        metrics=("acc",),
        yaml="boolq.yaml",
        split="validation",
        note="BoolQ validation, 3,270 items, SuperGLUE passage format",
    ),
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise QtoolError(
            f"tasks: unknown task '{name}'; use one of {', '.join(TASKS)} (or --text FILE for your own text)"
        )
    return TASKS[name]


def parse_tasks(text: str) -> list[str]:
    """``"piqa, arc_easy"`` → ``["piqa", "arc_easy"]``, each checked against the registry, duplicates dropped."""
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not names:
        raise QtoolError(f"tasks: no task given; use a comma-separated list of {', '.join(TASKS)}")
    for name in names:
        get_task(name)
    return names


def task_files(name: str, data_dir: str | Path) -> list[Path]:
    """The task's data files under ``data_dir``; a missing one is a ``QtoolError`` naming it and ``--data-dir``."""
    paths = [Path(data_dir) / f for f in get_task(name).files]
    for p in paths:
        if not p.is_file():
            raise QtoolError(
                f"data: {name} needs {p}, which does not exist; point --data-dir (or {DATA_DIR_ENV}) at the "
                "directory holding the evaluation data"
            )
    return paths


def find_assets_dir(starts: list[Path] | None = None) -> Path | None:
    """The shared assets directory (``…/shared/assets``, holding ``data/`` and ``models/``), found by walking up
    from the current directory and from this package looking for ``shared/assets/data`` (which also covers
    ``../shared/assets/data`` one level up). ``None`` when there is none."""
    starts = starts if starts is not None else [Path.cwd(), Path(__file__).resolve().parent]
    for start in starts:
        for d in [start, *start.parents]:
            if (d / "shared" / "assets" / "data").is_dir():
                return d / "shared" / "assets"
    return None


def default_data_dir() -> Path | None:
    """``$QTOOL_DATA_DIR``, else ``find_assets_dir()/data``, else ``None``."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    assets = find_assets_dir()
    return assets / "data" if assets else None


# ---- adapters: local file → the documents lm-eval's task definition expects (same fields as its hub dataset) ----


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _piqa(paths: list[Path]) -> list[dict]:
    """``{goal, sol1, sol2}`` + one 0/1 label per line in valid-labels.lst → ``{goal, sol1, sol2, label: int}``."""
    docs = _read_jsonl(paths[0])
    labels = [int(x) for x in paths[1].read_text(encoding="utf-8").split()]
    if len(labels) != len(docs):
        raise QtoolError(f"data: {paths[1]} has {len(labels)} labels for {len(docs)} items in {paths[0]}")
    return [
        {"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": y} for d, y in zip(docs, labels, strict=True)
    ]


def _arc(paths: list[Path]) -> list[dict]:
    """Already the HF ``ai2_arc`` schema ``{question, choices: {text, label}, answerKey}``."""
    return [
        {"question": d["question"], "choices": d["choices"], "answerKey": d["answerKey"]} for d in _read_jsonl(paths[0])
    ]


def _winogrande(paths: list[Path]) -> list[dict]:
    """Already the HF ``winogrande`` schema ``{sentence, option1, option2, answer: "1"|"2"}``."""
    keys = ("sentence", "option1", "option2", "answer")
    return [{k: d[k] for k in keys} for d in _read_jsonl(paths[0])]


def _hellaswag(paths: list[Path]) -> list[dict]:
    """OLMES rows ``{query, choices, gold}`` are lm-eval's ``process_docs`` output; ``label`` is the raw field the
    lm-eval YAML's ``doc_to_target: "{{label}}"`` reads (a digit string in the HF dataset)."""
    return [{"query": d["query"], "choices": d["choices"], "label": str(d["gold"])} for d in _read_jsonl(paths[0])]


def _lambada(paths: list[Path]) -> list[dict]:
    return [{"text": d["text"]} for d in _read_jsonl(paths[0])]


def _boolq(paths: list[Path]) -> list[dict]:
    """Google BoolQ dev rows ``{question, title, passage, answer: bool}`` → SuperGLUE rows (what lm-eval's boolq reads):
    ``passage = title + " -- " + passage``, ``label = int(answer)`` (0 = no, 1 = yes)."""
    return [
        {"question": d["question"], "passage": f"{d['title']} -- {d['passage']}", "label": int(d["answer"])}
        for d in _read_jsonl(paths[0])
    ]


ADAPTERS = {
    "piqa": _piqa,
    "arc_easy": _arc,
    "arc_challenge": _arc,
    "winogrande": _winogrande,
    "hellaswag": _hellaswag,
    "lambada": _lambada,
    "boolq": _boolq,
}


def load_docs(name: str, data_dir: str | Path) -> list[dict]:
    """The task's documents, in the fields lm-eval's task definition expects."""
    paths = task_files(name, data_dir)
    try:
        return ADAPTERS[name](paths)
    except (KeyError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise QtoolError(f"data: {paths[0]} is not in the expected format for {name} ({type(e).__name__}: {e})") from e


def load_local(qtool_task: str, qtool_data_dir: str, **_metadata):
    """lm-eval ``custom_dataset`` hook: ``{split: datasets.Dataset}`` built in memory from the local files (nothing
    is downloaded or cached). lm-eval passes the task's metadata and ``dataset_kwargs`` as keyword arguments."""
    import datasets

    spec = get_task(qtool_task)
    return datasets.DatasetDict({spec.split: datasets.Dataset.from_list(load_docs(qtool_task, qtool_data_dir))})


# WinoGrande prompt functions, as in lm-eval's tasks/winogrande/preprocess_winogrande.py: the text before the blank
# with each option is scored as a context, and the shared rest of the sentence is the continuation.
def winogrande_doc_to_text(doc: dict) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc: dict) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: dict) -> list[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]
