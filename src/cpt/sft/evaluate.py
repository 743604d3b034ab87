"""What instruction tuning gained and what it cost: plain-text forgetting, chat generations, and the gate.

* Plain-text bits per byte of the SFT model vs the CPT model on the eval stage's own sources (``role: eval`` text in
  data/clean and the shards' held-out documents), scored by ``cpt.evaluation``'s sliding-window scorer: the same
  bytes, the same tokenizer, so the difference is what tuning did to the language model underneath.
* Generations through the chat template (``apply_chat_template(..., add_generation_prompt=True)`` + ``generate``,
  the way a user of the exported folder calls it), greedy and sampled with the run's seed, for fixed vi/en prompts:
  ``reports/sft/samples.md``.
* The promotion gate of ``cpt.ops.gate`` with the CPT model as the reference: gain = held-out assistant-token bits
  per byte of the new-domain languages, forgetting = plain-text bits per byte of the old domain, each with its paired
  bootstrap 95% interval (``cpt.sft.intervals``), which is what the gate decides on; the SFT model is registered
  under ``sft.model_name`` and gets the alias only if it passes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from cpt.device import autocast
from cpt.evaluation.bpb import BpbScorer
from cpt.evaluation.models import LoadedModel, load_model
from cpt.evaluation.sources import EvalSource, collect_sources
from cpt.evaluation.uncertainty import Paired
from cpt.io import atomic_open
from cpt.layout import Layout
from cpt.ops import gate
from cpt.sft import intervals
from cpt.sft.intervals import Group
from cpt.sft.packing import PackedSplit

log = logging.getLogger("cpt.sft")


def score_models(layout: Layout, cfg: dict, cpt_dir: Path, sft_dir: Path, device: str, *, seed: int,
                 eval_splits: dict[str, PackedSplit], micro_batch: int, loss_chunk: int = 4096) -> dict[str, Any]:
    """Both models, one in memory at a time: plain-text bpb per source and per-conversation NLL of the held-out
    assistant tokens. ``{"cpt": {source: {bpb, bytes, lang, domain}}, "sft": {...}, "forgetting": {lang: sft - cpt},
    "scores": {model: {source: Score}}, "units": {model: {lang: per-conversation NLL}}}`` (the last two feed
    ``cpt.sft.intervals``). The plain-text units are eval's: documents cut into ``unit_bytes`` pieces, a seeded
    sample within ``max_docs`` / ``max_bytes`` (``max_bytes_old`` for old-domain sources when set: forgetting's
    interval must be narrower than ``gate.max_forgetting``, which takes more text than a gain of whole bits)."""
    sources = collect_sources(layout, {k: cfg[k] for k in ("sources", "max_docs", "max_bytes", "max_bytes_old",
                                                            "heldout", "unit_bytes")}, seed)
    out: dict[str, Any] = {"scores": {}, "units": {}, "sources": sources}
    for name, folder in (("cpt", cpt_dir), ("sft", sft_dir)):
        lm = load_model(name, folder, device=device)
        scorer = BpbScorer(lm, max_length=int(cfg["max_length"]), stride=int(cfg["stride"]),
                           batch_size=int(cfg["batch_size"]))
        out[name], out["scores"][name] = {}, {}
        for src in sources:
            s = scorer.score(src.texts, desc=src.name)
            out["scores"][name][src.name] = s
            out[name][src.name] = {"bpb": s.bpb, "bytes": s.bytes, "lang": src.lang, "domain": src.domain}
        out["units"][name] = {lang: intervals.conversation_nll(lm, split, micro_batch, loss_chunk)
                              for lang, split in sorted(eval_splits.items())}
        del lm, scorer
    out["forgetting"] = _pooled_delta(out["cpt"], out["sft"], sources)
    return out


def groups(scored: dict[str, Any], eval_splits: dict[str, PackedSplit], domains: dict[str, str]) -> list[Group]:
    """The bootstrap strata: one per held-out language (``sft_heldout_<lang>``, its conversations) and one per
    plain-text source (its scored units), each with the CPT model as reference and the SFT model as candidate."""
    out = []
    for lang, split in sorted(eval_splits.items()):
        out.append(Group(f"sft_heldout_{lang}", lang, domains.get(lang, "new"), "assistant",
                         Paired(scored["units"]["cpt"][lang], scored["units"]["sft"][lang], split.spans[:, 3])))
    for src in scored["sources"]:
        ref, cand = scored["scores"]["cpt"][src.name], scored["scores"]["sft"][src.name]
        out.append(Group(src.name, src.lang, src.domain, "plain", Paired(ref.doc_nll, cand.doc_nll, ref.doc_bytes),
                         docs=list(src.docs)))
    return out


def _pooled_delta(ref: dict, new: dict, sources: list[EvalSource]) -> dict[str, float]:
    """Per language: byte-weighted bpb of the SFT model minus the CPT model's (> 0: tuning cost bits)."""
    out = {}
    for lang in sorted({s.lang for s in sources}):
        names = [s.name for s in sources if s.lang == lang and ref.get(s.name, {}).get("bytes")]
        nbytes = sum(ref[n]["bytes"] for n in names)
        if nbytes:
            out[lang] = sum((new[n]["bpb"] - ref[n]["bpb"]) * ref[n]["bytes"] for n in names) / nbytes
    return out


@torch.no_grad()
def chat_samples(lm: LoadedModel, prompts: dict[str, list[str]], *, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int) -> list[dict[str, str]]:
    """``[{"lang", "prompt", "greedy", "sampled"}]``: replies through the chat template, special tokens dropped."""
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = []
    for lang, texts in prompts.items():
        for text in texts:
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
            ids = ids.to(lm.device)
            row = {"lang": lang, "prompt": text}
            for mode in ("greedy", "sampled"):
                kwargs = {"do_sample": False} if mode == "greedy" else {
                    "do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
                torch.manual_seed(seed)
                with autocast(lm.device, lm.amp_dtype):
                    gen = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                            max_new_tokens=max_new_tokens, pad_token_id=pad,
                                            eos_token_id=tok.eos_token_id, **kwargs)
                row[mode] = tok.decode(gen[0, ids.shape[1]:].tolist(), skip_special_tokens=True).strip()
            rows.append(row)
    return rows


def write_samples(path: Path, rows: list[dict[str, str]], cfg: dict, template_origin: str) -> None:
    lines = ["# SFT samples", "",
             f"Replies of the instruction-tuned model through its chat template ({template_origin}); greedy, and "
             f"sampled (temperature {cfg['temperature']}, top-p {cfg['top_p']}, the run's seed); at most "
             f"{cfg['max_new_tokens']} new tokens.", ""]
    for r in rows:
        lines += [f"## [{r['lang']}] {r['prompt']}", "", f"- **greedy:** {r['greedy'] or '(empty)'}",
                  f"- **sampled:** {r['sampled'] or '(empty)'}", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as fh:
        fh.write("\n".join(lines))


def apply_gate(params: dict, gate_cfg: dict, eval_like: dict, tracker, model_dir: Path, model_name: str, *,
               candidate: dict | None = None, rescore: Any = None) -> dict:
    """``cpt.ops.gate``'s decision and registry steps under the SFT model's own registered name; ``candidate`` and
    ``rescore`` (``cpt.sft.records``) let it judge the current ``cpt-sft`` champion unit by unit."""
    return gate.promote({**params, "gate": gate_cfg}, eval_like, tracker, model_dir, model_name, rescore=rescore,
                        candidate=candidate)
