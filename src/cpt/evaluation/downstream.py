"""Downstream tasks through lm-evaluation-harness: what the model can still do in English, and what it learned.

The field judges continual pretraining on downstream tasks as well as on loss (the TinyLlama continued-pretraining
study reports HellaSwag and PIQA with lm-evaluation-harness), so cpt runs lm-eval itself rather than re-writing its
scorers. The task definitions are lm-eval YAMLs shipped with cpt (``cpt/evaluation/tasks/cpt_<task>_<lang>.yaml``):
the prompts of lm-eval's own ``arc_easy``, ``piqa``, ``winogrande``, ``lambada_openai``, ``belebele_*`` and
``xcopa_*`` tasks, reading the local evaluation-only files under ``ingest.corpus_dir`` (``dataset_path: json``: no
hub). ``__CORPORA__`` in a template becomes the corpora folder's absolute path at run time, in a temporary folder
that ``TaskManager(include_path=..., include_defaults=False)`` indexes (lm-eval's ~10k built-in tasks are never
indexed: seconds saved, and no name can collide).

Scoring conventions (docs/downstream.md):

- zero-shot (``downstream.num_fewshot: 0``): few-shot examples would come from the same local files;
- one text -> ids rule with cpt's bits per byte (stack.md trap 17): lm-eval's defaults encode the context with the
  tokenizer's BOS and, for rolling log-likelihood, prefix BOS again. cpt passes ``add_bos_token=False`` and
  ``prefix_token_id`` = the model's ``TextCodec.prefix_id`` (the token the shards put before every training
  document), and ``CptLM`` conditions every context on that one token, exactly as ``cpt.evaluation.bpb`` scores a
  document. So a continuation's log-likelihood is the same number in lm-eval and in cpt's own scorer
  (tests/test_downstream.py checks it);
- the metric per task is named in ``TASKS``: ``acc_norm`` (summed log-likelihood / characters of the choice, lm-eval's
  normalisation) where the choices differ in length (ARC, PIQA: the sum alone favours the shorter answer), ``acc``
  where they are one letter (Belebele), the same sentence (WinoGrande's partial scoring), a cloze word (LAMBADA) or
  near-equal clauses (COPA/XCOPA, where lm-eval reports acc only). Both are tokenizer-independent (a sum over the
  same text, divided by characters), so base and cpt, with different vocabularies, are compared on equal terms.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from cpt.errors import ConfigError, DataError

log = logging.getLogger("cpt.evaluation.downstream")


@dataclass(frozen=True)
class TaskSpec:
    key: str  # <task>_<lang>: the name in params, metrics and reports
    lang: str
    metric: str  # acc | acc_norm: the number reported and compared
    files: tuple[str, ...]  # corpus files read (relative to the corpora folder): dvc.yaml deps
    chance: float  # accuracy of a uniform guess (reports say "at chance")

    @property
    def lm_eval_name(self) -> str:
        return f"cpt_{self.key}"


TASKS: dict[str, TaskSpec] = {t.key: t for t in (
    TaskSpec("arc_easy_en", "en", "acc_norm", ("arc_en_vi/arc_easy_test.en.jsonl",), 0.25),
    TaskSpec("piqa_en", "en", "acc_norm", ("en_commonsense/piqa_valid.jsonl",), 0.5),
    TaskSpec("copa_en", "en", "acc", ("en_commonsense/copa_val.en.jsonl",), 0.5),
    TaskSpec("winogrande_en", "en", "acc", ("en_commonsense/winogrande_dev.jsonl",), 0.5),
    TaskSpec("lambada_openai_en", "en", "acc", ("en_commonsense/lambada_openai_test.jsonl",), 0.0),
    TaskSpec("belebele_en", "en", "acc", ("belebele/eng_Latn.jsonl",), 0.25),
    TaskSpec("belebele_vi", "vi", "acc", ("belebele/vie_Latn.jsonl",), 0.25),
    TaskSpec("belebele_zh", "zh", "acc", ("belebele/zho_Hans.jsonl",), 0.25),
    TaskSpec("arc_easy_vi", "vi", "acc_norm", ("arc_en_vi/arc_easy_test.vi.jsonl",), 0.25),
    TaskSpec("xcopa_vi", "vi", "acc", ("xcopa/test.vi.jsonl",), 0.5),
    TaskSpec("xcopa_zh", "zh", "acc", ("xcopa/test.zh.jsonl",), 0.5),
)}
PLACEHOLDER = "__CORPORA__"


def template_dir() -> Path:
    """The shipped task YAML templates (package data: pyproject's ``tool.setuptools.package-data``)."""
    return Path(str(resources.files("cpt.evaluation") / "tasks"))


def specs(keys: list[str]) -> list[TaskSpec]:
    unknown = [k for k in keys if k not in TASKS]
    if unknown:
        raise ConfigError(f"downstream.tasks: unknown task(s) {unknown}; known: {sorted(TASKS)}")
    return [TASKS[k] for k in keys]


def write_tasks(keys: list[str], corpora: Path, folder: Path, *, templates: Path | None = None) -> Path:
    """The task YAMLs of ``keys`` with the corpora folder filled in, written into ``folder`` (returned). Every data
    file must exist: a missing one is named here, not deep inside ``datasets``."""
    corpora = Path(corpora).resolve()
    templates = templates or template_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for spec in specs(keys):
        for rel in spec.files:
            if not (corpora / rel).is_file():
                raise DataError(f"{corpora / rel}: data file of downstream task {spec.key} not found "
                                f"(ingest.corpus_dir = {corpora})")
        src = templates / f"{spec.lm_eval_name}.yaml"
        if not src.is_file():
            raise DataError(f"{src}: no task template for {spec.key}")
        text = src.read_text(encoding="utf-8").replace(PLACEHOLDER, corpora.as_posix())
        (folder / src.name).write_text(text, encoding="utf-8")
    return folder


def task_manager(folder: Path):
    """lm-eval's TaskManager over ``folder`` alone (``include_defaults=False``)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(folder), include_defaults=False)


def cpt_lm(path: Path, *, batch_size: int = 8, device: str = "cpu", max_length: int | None = None):
    """An lm-eval ``HFLM`` on a local HF folder under cpt's text -> ids rule (module docstring): no BOS added by the
    tokenizer (``add_bos_token=False``), every context and every rolling window conditioned on the model's
    ``prefix_id``. Float32 weights, as ``cpt.evaluation.models.load_model``."""
    from lm_eval.models.huggingface import HFLM

    from cpt.tok.codec import TextCodec

    prefix = TextCodec.from_folder(Path(path)).prefix_id

    class CptLM(HFLM):
        """HFLM whose contexts start with ``prefix_token_id``, as cpt scores every document (lm-eval's own
        ``_encode_pair`` splits context and continuation; the one token is put in front of the context)."""

        def _encode_pair(self, context: str, continuation: str):
            ctx, cont = super()._encode_pair(context, continuation)
            return [self.prefix_token_id, *ctx], cont

    kwargs: dict[str, Any] = {"max_length": max_length} if max_length else {}
    return CptLM(pretrained=str(path), device=device, dtype="float32", batch_size=batch_size,
                 add_bos_token=False, prefix_token_id=prefix, **kwargs)


def evaluate(lm, keys: list[str], folder: Path, *, limit: int | None, num_fewshot: int = 0,
             seed: int = 0) -> dict[str, dict[str, Any]]:
    """Run ``keys`` on one lm-eval model. Returns ``{key: {"items": {doc_id: {"acc": 0|1, "acc_norm": 0|1}},
    "acc": float, "acc_norm": float|None, "seconds": float}}``: per-item results (``log_samples``), the bootstrap
    pairs items of base and cpt by ``doc_id``. lm-eval's ``limit`` takes the first ``limit`` items of each file."""
    from lm_eval import simple_evaluate

    manager = task_manager(folder)
    out: dict[str, dict[str, Any]] = {}
    for spec in specs(keys):
        started = time.perf_counter()
        res = simple_evaluate(model=lm, tasks=[spec.lm_eval_name], num_fewshot=num_fewshot, limit=limit,
                              log_samples=True, task_manager=manager, bootstrap_iters=0, random_seed=seed,
                              numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
        samples = res["samples"][spec.lm_eval_name]
        items = {int(s["doc_id"]): {m: float(s[m]) for m in ("acc", "acc_norm") if m in s} for s in samples}
        if not items:
            raise DataError(f"downstream task {spec.key}: lm-eval returned no items")
        agg = res["results"][spec.lm_eval_name]
        out[spec.key] = {"items": items, "acc": agg.get("acc,none"), "acc_norm": agg.get("acc_norm,none"),
                         "seconds": round(time.perf_counter() - started, 2)}
        log.info("%-18s %s=%.3f on %d items (%.1f s)", spec.key, spec.metric,
                 agg.get(f"{spec.metric},none", float("nan")), len(items), out[spec.key]["seconds"])
    return out


def run_models(paths: dict[str, Path], keys: list[str], corpora: Path, *, limit: int | None, num_fewshot: int,
               batch_size: int, device: str, seed: int) -> dict[str, dict[str, dict[str, Any]]]:
    """``{model name: evaluate(...)}`` for each model folder (one model in memory at a time)."""
    import gc
    import os

    # local files only: `datasets` (imported by lm-eval) must not look for a hub (it reads this at import time)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="cpt-downstream-") as tmp:
        folder = write_tasks(keys, corpora, Path(tmp) / "tasks")
        for name, path in paths.items():
            if not (Path(path) / "config.json").is_file():
                raise DataError(f"{path}: no config.json; the {name} model folder is missing")
            lm = cpt_lm(Path(path), batch_size=batch_size, device=device)
            results[name] = evaluate(lm, keys, folder, limit=limit, num_fewshot=num_fewshot, seed=seed)
            del lm
            gc.collect()
    return results
