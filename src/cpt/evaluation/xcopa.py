"""XCOPA (Ponti et al. 2020): zero-shot causal commonsense by comparing the likelihood of the two choices.

Each item is turned into a context and two continuations, following lm-evaluation-harness's ``xcopa`` task:

    context      = premise without its final punctuation + connector   ("... vì" / "... nên"; "...因为" / "...所以")
    continuation = separator + choice with its first letter lower-cased ("" separator for Chinese)

The model's own tokenizer encodes ``context + continuation`` in one go (so the boundary tokenizes as in running text)
and the continuation score is the summed log-probability of the tokens after the context's tokens, conditioned on
the prefix token (BOS) + context. The prediction is the choice with the higher score.

Normalisation: the headline accuracy uses the SUM of log-probabilities (lm-eval's ``acc``): a sum over the same text
is comparable between tokenizers, a per-token mean is not. ``*_per_byte`` also reports the accuracy when each sum is
divided by the UTF-8 bytes of its continuation (removes the bias towards the shorter choice). Ties go to choice1.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from cpt.errors import ConfigError, DataError
from cpt.evaluation.bpb import BpbScorer, Window

CONNECTORS: dict[str, dict[str, str]] = {
    "vi": {"cause": "vì", "effect": "nên"},
    "zh": {"cause": "因为", "effect": "所以"},
    "en": {"cause": "because", "effect": "therefore"},
}
NO_SPACE_LANGS = {"zh", "ja"}
FINAL_PUNCT = ".。!！?？"
FIELDS = ("premise", "choice1", "choice2", "question", "label")


@dataclass(frozen=True)
class Item:
    premise: str
    choice1: str
    choice2: str
    question: str  # cause | effect
    label: int  # 0 -> choice1, 1 -> choice2
    where: str  # file:line, for messages


def load_items(folder: Path, lang: str, splits: list[str], max_items: int | None = None) -> list[Item]:
    """Items of ``<folder>/<split>.<lang>.jsonl`` for each split, in file order, capped at ``max_items``."""
    if lang not in CONNECTORS:
        raise ConfigError(f"eval.xcopa.langs: no connectors for {lang!r}; known: {sorted(CONNECTORS)}")
    items: list[Item] = []
    for split in splits:
        path = Path(folder) / f"{split}.{lang}.jsonl"
        if not path.exists():
            raise DataError(f"{path}: XCOPA file not found (eval.xcopa.dir / eval.xcopa.splits)")
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: not valid JSON: {exc.msg}") from exc
                missing = [f for f in FIELDS if f not in row]
                if missing:
                    raise DataError(f"{where}: missing field(s) {missing}")
                if row["question"] not in ("cause", "effect") or row["label"] not in (0, 1):
                    raise DataError(f"{where}: question must be cause|effect and label 0|1")
                items.append(Item(row["premise"], row["choice1"], row["choice2"], row["question"], row["label"], where))
    return items[:max_items] if max_items else items


def _lower_first(text: str) -> str:
    text = text.strip()
    return text[:1].lower() + text[1:]


def prompt(item: Item, lang: str) -> tuple[str, list[str]]:
    """(context, [continuation1, continuation2]) for one item."""
    premise = item.premise.strip()
    if premise and premise[-1] in FINAL_PUNCT:
        premise = premise[:-1]
    sep = "" if lang in NO_SPACE_LANGS else " "
    context = premise + sep + CONNECTORS[lang][item.question]
    return context, [sep + _lower_first(item.choice1), sep + _lower_first(item.choice2)]


def continuation_logprobs(scorer: BpbScorer, pairs: list[tuple[str, str]]) -> list[float]:
    """Summed log-probability of each continuation given its context (model's own tokenizer; see module doc)."""
    lm = scorer.lm
    ctx_ids = lm.encode([c for c, _ in pairs])
    whole_ids = lm.encode([c + x for c, x in pairs])
    seqs, windows = [], []
    for i, (ctx, whole) in enumerate(zip(ctx_ids, whole_ids)):
        if len(whole) <= len(ctx):  # the continuation merged into the context's last token: encode it apart
            whole = ctx + lm.encode([pairs[i][1]])[0]
        seq = [lm.prefix_id, *whole]
        first = 1 + len(ctx)
        begin = max(0, len(seq) - scorer.max_length)  # left-truncate very long items; keep >= 1 context token
        windows.append(Window(i, begin, len(seq), max(first, begin + 1)))
        seqs.append(seq)
    return [-nll for nll, _ in scorer.score_windows(seqs, windows, desc="xcopa")]


def accuracy(scorer: BpbScorer, items: list[Item], lang: str) -> dict[str, float | int]:
    """``{"acc", "acc_per_byte", "n", "stderr"}`` for one model on the items."""
    pairs, nbytes = [], []
    for item in items:
        context, conts = prompt(item, lang)
        for cont in conts:
            pairs.append((context, cont))
            nbytes.append(max(1, len(cont.encode("utf-8"))))
    lp = continuation_logprobs(scorer, pairs)
    correct = correct_pb = 0
    for k, item in enumerate(items):
        a, b = lp[2 * k], lp[2 * k + 1]
        correct += int((1 if b > a else 0) == item.label)
        correct_pb += int((1 if b / nbytes[2 * k + 1] > a / nbytes[2 * k] else 0) == item.label)
    n = len(items)
    acc = correct / n if n else float("nan")
    return {
        "acc": round(acc, 4),
        "acc_per_byte": round(correct_pb / n, 4) if n else float("nan"),
        "n": n,
        "stderr": round(math.sqrt(acc * (1 - acc) / n), 4) if n else float("nan"),
    }
