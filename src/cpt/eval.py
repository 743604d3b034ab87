"""Stage ``eval``: did the model gain the new language, and what did it forget? Base vs cpt, side by side.

Both models score the same documents with their own tokenizers; bits per UTF-8 byte makes the numbers comparable
across the vocabulary extension (``cpt.evaluation.bpb``). Per language:

    forgetting = bpb(cpt) - bpb(base)   pooled over the old-domain sources of that language (> 0: forgot)
    gain       = bpb(base) - bpb(cpt)   pooled over the new-domain sources of that language (> 0: learned)

Sources: every ``role: eval`` source in data/clean (WikiText-2 test, NTREX-128 ...), plus the held-out training-
distribution documents the shards stage split off (data/shards/heldout.jsonl), scored per language as
``heldout_<lang>``. XCOPA accuracy (likelihood of the two choices), greedy/sampled generations, and a one-page report
with the training curves go to reports/eval/. Before scoring, the training shards are decoded and checked for
evaluation documents (``cpt.evaluation.overlap``): a leak stops the stage.
"""

from __future__ import annotations

import copy
import gc
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cpt import tracking
from cpt.errors import ConfigError, DataError
from cpt.evaluation import overlap, report, samples, xcopa
from cpt.evaluation.bpb import BpbScorer, Score
from cpt.evaluation.models import load_model
from cpt.io import read_jsonl
from cpt.layout import Layout
from cpt.params import section
from cpt.records import iter_docs, select_sources

log = logging.getLogger("cpt.eval")

DEFAULTS: dict[str, Any] = {
    "base": "data/base",
    "model": "data/models/cpt",
    "heldout": "data/shards/heldout.jsonl",
    "train_curve": "metrics/train_curve.csv",
    "sources": None,
    "max_docs": 100,
    "max_bytes": 20_000,
    "max_length": 1024,
    "stride": 768,
    "batch_size": 8,
    "device": "auto",
    "dtype": "auto",
    "threads": None,
    "overlap": {"enabled": True, "shards": "data/shards", "max_tokens": 50_000_000, "fail": True},
    "xcopa": {"enabled": True, "dir": None, "langs": ["vi", "zh"], "splits": ["val"], "max_items": None},
    "samples": {
        "enabled": True,
        "max_new_tokens": 40,
        "temperature": 0.8,
        "top_p": 0.95,
        "prompts": {
            "en": ["The history of the city begins"],
            "vi": ["Hà Nội là thủ đô của", "Sông Mê Kông chảy qua"],
            "zh": ["北京是中国的"],
        },
    },
}


def config(params: dict) -> dict[str, Any]:
    """The eval section merged over DEFAULTS (nested sections merged key by key), with ranges checked."""
    cfg = copy.deepcopy(DEFAULTS)
    for key, value in section(params, "eval").items():
        if key not in cfg:
            raise ConfigError(f"eval.{key}: unknown key; known: {sorted(cfg)}")
        if isinstance(cfg[key], dict) and key != "samples":
            if not isinstance(value, dict):
                raise ConfigError(f"eval.{key}: expected a mapping")
            unknown = set(value) - set(cfg[key])
            if unknown:
                raise ConfigError(f"eval.{key}: unknown key(s) {sorted(unknown)}; known: {sorted(cfg[key])}")
            cfg[key].update(value)
        elif key == "samples":
            cfg[key].update(value or {})
        else:
            cfg[key] = value
    for key in ("max_length", "stride", "batch_size"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"eval.{key}: must be a positive integer, got {cfg[key]!r}")
    if cfg["max_length"] < 2 or cfg["stride"] >= cfg["max_length"]:
        raise ConfigError(f"eval.stride ({cfg['stride']}) must be < eval.max_length ({cfg['max_length']})")
    for key in ("max_docs", "max_bytes", "threads"):
        if cfg[key] is not None and (not isinstance(cfg[key], int) or cfg[key] < 1):
            raise ConfigError(f"eval.{key}: must be a positive integer or null, got {cfg[key]!r}")
    return cfg


@dataclass
class EvalSource:
    name: str
    lang: str
    domain: str
    origin: str  # "eval" (a role: eval source) or "heldout" (split off by the shards stage)
    texts: list[str]  # the documents scored (whole documents, within the budget)
    available: int  # documents before the budget
    truncated: int = 0  # 1 when the last document was cut to the byte budget


def prefix(text: str, max_bytes: int) -> str:
    """The longest prefix of ``text`` within ``max_bytes`` UTF-8 bytes, cut at a line (else a space) boundary when
    one lies in the second half; the scored bytes are then exactly this prefix's."""
    head = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    for sep in ("\n", " "):
        cut = head.rfind(sep)
        if cut >= len(head) // 2:
            return head[:cut]
    return head


def budget(texts: list[str], max_docs: int | None, max_bytes: int | None) -> tuple[list[str], int]:
    """Documents in file order until ``max_docs`` or ``max_bytes``; returns (texts, documents cut). The document that
    crosses the byte budget contributes its prefix up to the budget (``prefix``), so every source is scored on about
    ``max_bytes`` whatever its document sizes (one WikiText article can be 30 KB, one Gutenberg book 1 MB)."""
    out, total = [], 0
    for text in texts:
        if max_docs is not None and len(out) >= max_docs:
            break
        size = len(text.encode("utf-8"))
        if max_bytes is not None and total + size > max_bytes:
            head = prefix(text, max_bytes - total)
            if head.strip():
                out.append(head)
                return out, 1
            break
        out.append(text)
        total += size
    return out, 0


def collect_sources(layout: Layout, cfg: dict) -> list[EvalSource]:
    try:
        infos = select_sources(layout.clean, role="eval")
    except FileNotFoundError as exc:
        raise DataError(str(exc)) from exc
    wanted = cfg["sources"]
    if wanted is not None:
        known = {s.name for s in infos}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise ConfigError(f"eval.sources: {unknown} are not role: eval sources in {layout.clean}; known: {sorted(known)}")
        infos = [s for s in infos if s.name in wanted]
    out = []
    for info in infos:
        texts = [d["text"] for d in iter_docs(layout.clean, role="eval", name=info.name) if d["text"].strip()]
        chosen, cut = budget(texts, cfg["max_docs"], cfg["max_bytes"])
        out.append(EvalSource(info.name, info.lang, info.domain, "eval", chosen, len(texts), cut))
    for name, (lang, domain, texts) in heldout_groups(layout, cfg).items():
        chosen, cut = budget(texts, cfg["max_docs"], cfg["max_bytes"])
        out.append(EvalSource(name, lang, domain, "heldout", chosen, len(texts), cut))
    out = [s for s in out if s.texts]
    if not out:
        raise DataError(f"{layout.clean}: no role: eval documents and no held-out documents to evaluate")
    return out


def heldout_groups(layout: Layout, cfg: dict) -> dict[str, tuple[str, str, list[str]]]:
    """``heldout_<lang>`` -> (lang, domain, texts) from the shards stage's held-out records."""
    if not cfg["heldout"]:
        return {}
    path = layout.resolve(cfg["heldout"])
    if not path.exists():
        raise DataError(f"{path}: held-out documents not found; run `cpt shards` first (or set eval.heldout: null)")
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for row in read_jsonl(path):
        if row.get("role", "train") != "train":
            raise DataError(f"{path}: record {row.get('id')!r} has role {row.get('role')!r}; held-out must be train")
        if row.get("text", "").strip():
            groups[(row.get("lang", "und"), row.get("domain", "new"))].append(row["text"])
    langs = defaultdict(int)
    for lang, _ in groups:
        langs[lang] += 1
    return {
        (f"heldout_{lang}" if langs[lang] == 1 else f"heldout_{lang}_{domain}"): (lang, domain, texts)
        for (lang, domain), texts in sorted(groups.items())
    }


def check_overlap(layout: Layout, cfg: dict) -> dict[str, Any]:
    """Eval (and held-out) documents found in the clean training records / the training shards; see overlap.py."""
    ocfg = cfg["overlap"]
    if not ocfg["enabled"]:
        return {"enabled": 0}
    eval_docs: dict[str, list[str]] = defaultdict(list)
    for doc in iter_docs(layout.clean, role="eval"):
        eval_docs[doc["source"]].append(doc["text"])
    heldout = [t for _, _, texts in heldout_groups(layout, cfg).values() for t in texts]

    encode, segments, tokens = None, [], 0
    if ocfg["shards"]:
        meta, streams = overlap.shard_streams(layout.resolve(ocfg["shards"]))
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(layout.resolve(meta.get("tokenizer") or layout.tokenizer))
        tok.model_max_length = 1 << 62  # whole documents; this tokenizer only encodes here

        def encode(texts: list[str]) -> list[list[int]]:
            return tok(texts, add_special_tokens=False)["input_ids"]

        specials = [i for i in (meta.get("bos_id"), tok.bos_token_id, tok.pad_token_id) if i is not None]
        for path in streams:
            segs = list(overlap.shard_segments(path, meta["dtype"], int(meta["eos_id"]), specials, ocfg["max_tokens"]))
            tokens += sum(len(s) for s in segs)
            segments.extend(segs)

    eval_index, held_index = overlap.OverlapIndex(), overlap.OverlapIndex()
    for src, texts in eval_docs.items():
        eval_index.add(src, texts, encode)
    held_index.add("heldout", heldout, encode)
    n_records, leaks_records, ex1 = eval_index.find_texts(d["text"] for d in iter_docs(layout.clean, role="train"))
    n_shard, leaks_shards, ex2 = eval_index.find_segments(segments)
    _, held_leaks, ex3 = held_index.find_segments(segments)
    result = {
        "enabled": 1,
        "eval_docs_indexed": sum(len(v) for v in eval_docs.values()),
        "heldout_docs_indexed": len(heldout),
        "train_records_checked": n_records,
        "shard_docs_checked": n_shard,
        "shard_tokens_checked": tokens,
        "eval_docs_in_train_records": sum(leaks_records.values()),
        "eval_docs_in_train_shards": sum(leaks_shards.values()),
        "heldout_docs_in_train_shards": sum(held_leaks.values()),
    }
    leaked = {k: leaks_records.get(k, 0) + leaks_shards.get(k, 0) for k in sorted(set(leaks_records) | set(leaks_shards))}
    if leaked and ocfg["fail"]:
        raise DataError(
            f"{layout.clean} / {ocfg['shards']}: evaluation documents found in the training data "
            f"({leaked}); e.g. {(ex1 + ex2)[:2]}. The role barrier is broken upstream; refusing to report "
            f"contaminated numbers (eval.overlap.fail: false to report anyway)"
        )
    if leaked:
        log.warning("evaluation documents found in the training data: %s", leaked)
    if held_leaks:
        log.warning("%d held-out documents also appear in the training shards (%s): heldout_* bpb is optimistic",
                    sum(held_leaks.values()), ex3[:1])
    return result


def pooled(scores: dict[str, Score], sources: list[EvalSource], *, domain: str | None = None) -> dict[str, Score]:
    """Per-language Score summed over the sources of that language (and domain)."""
    out: dict[str, Score] = {}
    for s in sources:
        if domain is None or s.domain == domain:
            out[s.lang] = out.get(s.lang, Score()).add(scores[s.name])
    return out


def run(params: dict, layout: Layout) -> dict:
    cfg = config(params)
    threads = torch.get_num_threads()
    if cfg["threads"]:
        # Tiny models on a shared CPU: intra-op threads that wait on each other cost more than they give.
        torch.set_num_threads(int(cfg["threads"]))
    try:
        return _run(params, layout, cfg)
    finally:
        torch.set_num_threads(threads)


def _run(params: dict, layout: Layout, cfg: dict) -> dict:
    seed = int(params.get("seed", 0))
    torch.manual_seed(seed)
    sources = collect_sources(layout, cfg)
    for s in sources:
        log.info("source %-16s %s/%-3s %4d of %4d docs, %d bytes", s.name, s.domain, s.lang, len(s.texts),
                 s.available, sum(len(t.encode()) for t in s.texts))
    overlap_result = check_overlap(layout, cfg)

    xcfg = cfg["xcopa"]
    xcopa_items: dict[str, list[xcopa.Item]] = {}
    if xcfg["enabled"]:
        corpus = section(params, "ingest").get("corpus_dir", "../shared/corpora")
        folder = layout.resolve(xcfg["dir"]) if xcfg["dir"] else layout.resolve(corpus) / "xcopa"
        for lang in xcfg["langs"]:
            xcopa_items[lang] = xcopa.load_items(folder, lang, list(xcfg["splits"]), xcfg["max_items"])

    paths = {"base": layout.resolve(cfg["base"]), "cpt": layout.resolve(cfg["model"])}
    scores: dict[str, dict[str, Score]] = {}
    xacc: dict[str, dict[str, dict]] = {}
    gens: dict[str, list[dict[str, str]]] = {}
    info: dict[str, dict[str, Any]] = {}
    for name, path in paths.items():
        lm = load_model(name, path, device=cfg["device"], dtype=cfg["dtype"])
        scorer = BpbScorer(lm, cfg["max_length"], cfg["stride"], cfg["batch_size"])
        info[name] = {"path": _shown(path, layout), "params": lm.parameters, "vocab": len(lm.tokenizer),
                      "max_length": scorer.max_length, "stride": scorer.stride}
        scores[name] = {s.name: scorer.score(s.texts, desc=s.name) for s in sources}
        for s in sources:
            log.info("%s %-16s bpb %.4f (loss %.4f over %d tokens)", name, s.name, scores[name][s.name].bpb,
                     scores[name][s.name].loss, scores[name][s.name].tokens)
        xacc[name] = {lang: xcopa.accuracy(scorer, items, lang) for lang, items in xcopa_items.items()}
        scfg = cfg["samples"]
        if scfg.get("enabled", True) and scfg.get("prompts"):
            gens[name] = samples.generate(
                lm, scfg["prompts"], max_new_tokens=int(scfg["max_new_tokens"]),
                temperature=float(scfg["temperature"]), top_p=float(scfg["top_p"]), seed=seed,
            )
        del lm, scorer
        gc.collect()

    metrics = assemble(scores, sources, xacc, overlap_result)
    out_dir = layout.reports / "eval"
    report.write_all(
        out_dir, metrics=metrics, sources=sources, scores=scores, xcopa_items=xcopa_items, samples=gens,
        models=info, curve=layout.resolve(cfg["train_curve"]), cfg=cfg,
    )
    tracker = tracking.current()
    for path in sorted(out_dir.glob("*")):
        tracker.log_artifact(path, "eval")
    return metrics


def _shown(path: Path, layout: Layout) -> str:
    """A path as the report shows it: relative to the project root when inside it (stable across machines)."""
    try:
        return str(Path(path).relative_to(layout.root))
    except ValueError:
        return str(path)


def assemble(scores: dict[str, dict[str, Score]], sources: list[EvalSource], xacc: dict, overlap_result: dict) -> dict:
    meta = {s.name: {"lang": s.lang, "domain": s.domain, "truncated": s.truncated} for s in sources}
    metrics: dict[str, Any] = {
        name: {s: {**sc.to_dict(), **meta[s]} for s, sc in per.items()} for name, per in scores.items()
    }
    metrics["bpb_by_lang"] = {name: {lang: round(sc.bpb, 6) for lang, sc in pooled(per, sources).items()}
                              for name, per in scores.items()}
    old_b, old_c = pooled(scores["base"], sources, domain="old"), pooled(scores["cpt"], sources, domain="old")
    new_b, new_c = pooled(scores["base"], sources, domain="new"), pooled(scores["cpt"], sources, domain="new")
    metrics["forgetting"] = {lang: round(old_c[lang].bpb - old_b[lang].bpb, 6) for lang in sorted(old_b)}
    metrics["gain"] = {lang: round(new_b[lang].bpb - new_c[lang].bpb, 6) for lang in sorted(new_b)}
    metrics["xcopa"] = {
        lang: {
            "base": xacc["base"][lang]["acc"], "cpt": xacc["cpt"][lang]["acc"], "n": xacc["base"][lang]["n"],
            "base_per_byte": xacc["base"][lang]["acc_per_byte"], "cpt_per_byte": xacc["cpt"][lang]["acc_per_byte"],
        }
        for lang in xacc.get("base", {})
    }
    metrics["overlap"] = overlap_result
    return metrics
