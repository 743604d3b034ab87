"""The sft stage end to end: data -> template -> packed rows -> training -> eval -> gate. Each step is one call into
its own module (data, template, packing, loop, evaluate); this file only wires them and writes the outputs."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from cpt.errors import DataError
from cpt.io import write_jsonl
from cpt.layout import Layout
from cpt.ops import tracking
from cpt.sft import data as sft_data
from cpt.sft import evaluate as sft_eval
from cpt.sft import intervals as sft_intervals
from cpt.sft import loop, template
from cpt.sft import records as sft_records
from cpt.sft.packing import PackedSplit, pack
from cpt.training import distributed

log = logging.getLogger("cpt.sft")
# the tokenizer's files in an HF folder (weights and model config stay behind)
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                   "chat_template*", "new_tokens.json")


def folders(layout: Layout, cfg: dict) -> dict[str, Path]:
    return {"model": layout.resolve(cfg["model"]), "out": layout.resolve(cfg["out"]), "data": layout.data / "sft",
            "checkpoints": layout.data / "sft_checkpoints", "reports": layout.reports / "sft"}


def chat_tokenizer(model_dir: Path, setting: str, dest: Path, base_dir: Path | None = None, write: bool = True):
    """The CPT model's tokenizer with the chat template set, saved (with every other tokenizer file of the model
    folder, e.g. tokenizer.model, new_tokens.json) into ``dest``: the tokenizer files of the exported folder.
    ``write``: only rank 0 writes (the others use the tokenizer in memory)."""
    from transformers import AutoTokenizer

    if not (model_dir / "config.json").exists():
        raise DataError(f"{model_dir}: no config.json; run `cpt train` first (or set sft.model)")
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.model_max_length = 1 << 62  # long conversations are dropped by sft.max_length, not by a tokenizer warning
    template.check_tokenizer(tok, model_dir)
    text, origin = template.choose_template(tok, setting, base_dir)
    tok.chat_template = text
    if not write:
        return tok, text, origin
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and any(f.match(pattern) for pattern in TOKENIZER_FILES):
            shutil.copy2(f, dest / f.name)
    tok.save_pretrained(dest)
    return tok, text, origin


def encode_split(tok, examples: list[dict], max_length: int, quarantine: list[dict], stats: dict,
                 kept_examples: list | None = None) -> list:
    """Encoded conversations that fit a row (n ids -> n - 1 positions); longer ones are dropped (``too_long``):
    truncating would cut the reply and its EOS, teaching the model not to stop. ``kept_examples`` (a list) receives
    the examples kept, in the same order."""
    encoded = template.encode(tok, [ex["messages"] for ex in examples])
    kept = []
    for ex, enc in zip(examples, encoded):
        if len(enc.ids) - 1 > max_length:
            quarantine.append({"source": ex["source"], "line": ex["line"], "id": ex["id"], "reason": "too_long",
                               "detail": f"{len(enc.ids)} tokens > sft.max_length {max_length} + 1", "ref": None})
            stats[ex["source"]]["too_long"] = stats[ex["source"]].get("too_long", 0) + 1
            stats[ex["source"]][ex["role"]] -= 1
            stats[ex["source"]]["kept"] -= 1
            continue
        kept.append(enc)
        if kept_examples is not None:
            kept_examples.append(ex)
    return kept


def run(cfg: dict, seed: int, layout: Layout, params: dict, info: distributed.DistInfo, device: torch.device,
        given: set[str] = frozenset()) -> dict[str, Any]:
    t0 = time.perf_counter()
    paths = folders(layout, cfg)
    tok, text, origin = chat_tokenizer(paths["model"], cfg["chat_template"], paths["data"] / "tokenizer",
                                       layout.base, write=info.main)
    corpus_dir = layout.resolve((params.get("ingest") or {}).get("corpus_dir", "../shared/corpora"))
    sources = sft_data.check_sources(cfg["sources"], corpus_dir)
    prep = sft_data.prepare(sources, seed=seed, eval_fraction=float(cfg["eval_fraction"]), max_eval=cfg["max_eval"],
                            forbidden=template.forbidden_strings(tok, text),
                            clean_dir=layout.clean if (layout.clean / "manifest.json").exists() else None,
                            decontam=cfg["decontam"])
    domains = {s["lang"]: s["domain"] for s in sources}
    groups: dict[tuple[str, str], list[dict]] = {}
    for ex in prep.examples:
        key = (ex["role"], ex["domain"]) if ex["role"] == "train" else ("eval", ex["lang"])
        groups.setdefault(key, []).append(ex)
    pad = tok.eos_token_id
    packed: dict[tuple[str, str], PackedSplit] = {}
    heldout: dict[str, tuple[list[dict], list]] = {}  # lang -> (kept eval examples, encodings): the gate's units
    for key, exs in sorted(groups.items()):
        kept: list[dict] = []
        enc = encode_split(tok, exs, int(cfg["max_length"]), prep.quarantine, prep.stats, kept)
        if enc:
            packed[key] = pack(f"{key[0]}/{key[1]}", enc, int(cfg["max_length"]), pad)
            if key[0] == "eval":
                heldout[key[1]] = (kept, enc)
    train_splits = {d: packed.get(("train", d)) for d in ("new", "old")}
    eval_splits = {k[1]: v for k, v in packed.items() if k[0] == "eval"}
    for domain, needed in (("new", 1.0 - float(cfg["replay_ratio"])), ("old", float(cfg["replay_ratio"]))):
        if needed > 0 and train_splits[domain] is None:
            raise DataError(f"sft: no domain: {domain} training conversations left after cleaning, but "
                            f"sft.replay_ratio={cfg['replay_ratio']} needs them (see {paths['data']}/quarantine.jsonl; "
                            f"raise sft.max_length or max_examples)")
    if info.main:
        write_jsonl(paths["data"] / "train.jsonl", (e for e in prep.examples if e["role"] == "train"))
        write_jsonl(paths["data"] / "eval.jsonl", (e for e in prep.examples if e["role"] == "eval"))
        write_jsonl(paths["data"] / "quarantine.jsonl", prep.quarantine)
    if info.enabled:
        torch.distributed.barrier()  # the chat tokenizer is on disk before any rank exports from it
    prep_seconds = time.perf_counter() - t0
    log.info("data: %s; packed %s", prep.stats, {p.name: (p.examples, p.n_blocks, round(p.fill, 3))
                                                for p in packed.values()})

    trained = loop.train(cfg, seed, model_dir=paths["model"], tokenizer_dir=paths["data"] / "tokenizer",
                         train_splits=train_splits, eval_splits=eval_splits, out=paths["out"],
                         ckdir=paths["checkpoints"], info=info, device=device, given=given)
    if not info.main:
        return {}
    first, last = trained["curve"][0], trained["curve"][-1]
    assistant = {lang: {"cpt_loss": first[f"loss_{lang}"], "sft_loss": last[f"loss_{lang}"],
                        "cpt_bpb": first[f"bpb_{lang}"], "sft_bpb": last[f"bpb_{lang}"],
                        "bytes": eval_splits[lang].target_bytes, "tokens": eval_splits[lang].target_tokens,
                        "examples": eval_splits[lang].examples} for lang in sorted(eval_splits)}
    t1 = time.perf_counter()
    scored = sft_eval.score_models(layout, cfg["plain_eval"], paths["model"], paths["out"], cfg["device"], seed=seed,
                                   eval_splits=eval_splits, micro_batch=int(cfg["micro_batch"]),
                                   loss_chunk=int(cfg["loss_chunk"]))
    strata = sft_eval.groups(scored, eval_splits, domains)
    summary = sft_intervals.summarize(strata, resamples=int(cfg["bootstrap_resamples"]), seed=seed)
    sft_lm = sft_eval.load_model("sft", paths["out"], device=cfg["device"])
    samples = sft_eval.chat_samples(sft_lm, cfg["samples"]["prompts"], seed=seed,
                                    **{k: cfg["samples"][k] for k in ("max_new_tokens", "temperature", "top_p")})
    sft_eval.write_samples(paths["reports"] / "samples.md", samples, cfg["samples"], origin)
    eval_seconds = time.perf_counter() - t1
    tracker = tracking.current()
    # the candidate's per-unit record, and a re-scorer for a champion judged on other units (cpt.sft.records)
    decision = sft_eval.apply_gate(params, cfg["gate"], sft_intervals.gate_inputs(summary, strata), tracker,
                                   paths["out"], cfg["model_name"],
                                   candidate=sft_records.candidate(cfg, heldout, scored, domains),
                                   rescore=sft_records.rescorer(layout, cfg, seed, heldout, domains))
    tracker.log_artifact(paths["reports"], "sft")
    return {
        "chat_template": origin, "data": prep.stats,
        "packing": {p.name: {"examples": p.examples, "rows": p.n_blocks, "fill": p.fill,
                             "target_tokens": p.target_tokens} for p in packed.values()},
        "assistant": assistant, "plain": {k: scored[k] for k in ("cpt", "sft")}, "forgetting": scored["forgetting"],
        # per language, with paired bootstrap 95% intervals: assistant-token gain, plain-text forgetting
        **{k: summary[k] for k in ("gain", "gain_ci95", "forgetting_ci95", "sources", "bootstrap")},
        "gate": decision, "train": {k: v for k, v in trained.items() if k != "curve"}, "curve": trained["curve"],
        "prep_seconds": prep_seconds, "eval_seconds": eval_seconds, "samples": len(samples),
        "device": device.type,
    }
