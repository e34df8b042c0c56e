"""Bridge to lm-evaluation-harness: run qtool's local task YAMLs (``configs/tasks/``) on an already-loaded model.

The model goes in as ``HFLM(pretrained=<model>)``, so what is evaluated is exactly what qtool loaded (FP, GGUF,
quantized or packed). Nothing reaches the network: the YAMLs read local files, and ``offline()`` sets
``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` (environment and the already-imported libraries' flags) for the call.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from qtool.errors import QtoolError
from qtool.eval.tasks import TASKS_DIR, get_task

log = logging.getLogger(__name__)

# lm-eval bootstraps the stderr of non-mean metrics (lambada's perplexity) with 100,000 resamples in a process pool
# by default; 1,000 in-process resamples give the stderr to ~2 % and take a second on 2 cores.
BOOTSTRAP_ITERS = 1000
_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DISABLE_MULTIPROC": "1"}


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hub and datasets offline for the duration (restored afterwards). Also patches the flags of
    ``huggingface_hub``/``datasets`` when they were imported before the environment was set."""
    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    os.environ.update(_OFFLINE_ENV)
    patched = []
    for mod_name, attr in (
        ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_DATASETS_OFFLINE"),
    ):
        mod = sys.modules.get(mod_name)
        if mod is not None and hasattr(mod, attr):
            patched.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, True)
    try:
        yield
    finally:
        for mod, attr, value in reversed(patched):
            setattr(mod, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def task_manager(data_dir: str | Path, tasks_dir: Path = TASKS_DIR):
    """An lm-eval ``TaskManager`` over qtool's YAMLs only (lm-eval's hub-backed built-ins are not indexed)."""
    from lm_eval.tasks import TaskManager

    if not tasks_dir.is_dir():
        raise QtoolError(f"tasks: task YAML directory {tasks_dir} does not exist; reinstall qtool from its repository")
    return TaskManager(
        include_path=str(tasks_dir), include_defaults=False, metadata={"qtool_data_dir": str(Path(data_dir).resolve())}
    )


def run_lm_eval(
    model, tokenizer, tasks: list[str], data_dir: str | Path, limit: int | None = None, batch_size: int = 1
) -> dict:
    """Run lm-eval tasks (qtool names, e.g. ``["piqa", "arc_easy"]``) zero-shot on ``model``.

    Returns ``{task: {metric: {"value", "stderr", "n"}}}`` with ``n`` the number of documents scored (after
    ``limit``, which takes the first ``limit`` documents). Accuracies are fractions in [0, 1].
    """
    with offline():
        try:
            from lm_eval import simple_evaluate
            from lm_eval.models.huggingface import HFLM
        except ImportError as e:
            raise QtoolError(f"tasks: {', '.join(tasks)} need lm-evaluation-harness; pip install 'qtool[eval]'") from e

        names = {get_task(t).lm_eval_task: t for t in tasks}
        if None in names:
            raise QtoolError(f"tasks: {names[None]} is not an lm-eval task; evaluate it with qtool.eval.results")
        # HFLM sets a pad token on the tokenizer it gets; keep the caller's tokenizer untouched.
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        captured = io.StringIO()  # lm-eval prints progress notes to stdout; only qtool's CLI writes there
        with contextlib.redirect_stdout(captured):
            out = simple_evaluate(
                model=lm,
                tasks=list(names),
                task_manager=task_manager(data_dir),
                limit=limit,
                bootstrap_iters=BOOTSTRAP_ITERS,
                log_samples=False,
            )
        if captured.getvalue().strip():
            log.debug("lm-eval: %s", captured.getvalue().strip())
    return {names[name]: _metrics(name, out, get_task(names[name]).metrics) for name in names}


def _metrics(lm_task: str, out: dict, metrics: tuple[str, ...]) -> dict:
    """lm-eval's ``{"acc,none": v, "acc_stderr,none": s}`` → ``{"acc": {"value", "stderr", "n"}}``."""
    row = out["results"][lm_task]
    n = int(out["n-samples"][lm_task]["effective"])
    result = {}
    for metric in metrics:
        value = row[f"{metric},none"]
        stderr = row.get(f"{metric}_stderr,none")
        stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
        result[metric] = {"value": float(value), "stderr": stderr, "n": n}
    return result
