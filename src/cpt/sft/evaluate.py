"""What instruction tuning gained and what it cost: plain-text forgetting, chat generations, and the gate.

* Plain-text bits per byte of the SFT model vs the CPT model on the eval stage's own sources (``role: eval`` text in
  data/clean and the shards' held-out documents), scored by ``cpt.evaluation``'s sliding-window scorer: the same
  bytes, the same tokenizer, so the difference is what tuning did to the language model underneath.
* Generations through the chat template (``apply_chat_template(..., add_generation_prompt=True)`` + ``generate``,
  the way a user of the exported folder calls it), greedy and sampled with the run's seed, for fixed vi/en prompts:
  ``reports/sft/samples.md``.
* The promotion gate of ``cpt.ops.gate`` with the CPT model as the reference: gain = held-out assistant-token bits
  per byte of the new-domain languages, forgetting = plain-text bits per byte of the old domain, both byte-weighted;
  the SFT model is registered under ``sft.model_name`` and gets the alias only if it passes.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from cpt.device import autocast
from cpt.evaluation.bpb import BpbScorer
from cpt.evaluation.models import LoadedModel, load_model
from cpt.evaluation.sources import EvalSource, collect_sources
from cpt.io import atomic_open
from cpt.layout import Layout
from cpt.ops import gate

log = logging.getLogger("cpt.sft")


def plain_text(layout: Layout, cfg: dict, cpt_dir: Path, sft_dir: Path, device: str) -> dict[str, Any]:
    """``{"cpt": {source: {bpb, bytes, lang, domain}}, "sft": {...}, "forgetting": {lang: sft - cpt}}``."""
    sources = collect_sources(layout, {"sources": cfg["sources"], "max_docs": cfg["max_docs"],
                                       "max_bytes": cfg["max_bytes"], "heldout": cfg["heldout"]})
    out: dict[str, Any] = {}
    for name, folder in (("cpt", cpt_dir), ("sft", sft_dir)):
        lm = load_model(name, folder, device=device)
        scorer = BpbScorer(lm, max_length=int(cfg["max_length"]), stride=int(cfg["stride"]),
                           batch_size=int(cfg["batch_size"]))
        out[name] = {}
        for src in sources:
            s = scorer.score(src.texts, desc=src.name)
            out[name][src.name] = {"bpb": s.bpb, "bytes": s.bytes, "lang": src.lang, "domain": src.domain}
        del lm, scorer
    out["forgetting"] = _pooled_delta(out["cpt"], out["sft"], sources)
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


def gate_inputs(assistant: dict[str, dict], plain: dict[str, Any], domains: dict[str, str]) -> dict[str, Any]:
    """The eval-metrics shape ``cpt.ops.gate.decide`` reads, with the CPT model as ``base`` and SFT as ``cpt``:
    new-domain languages' held-out assistant bytes (gain), old-domain plain text (forgetting)."""
    out: dict[str, dict] = {"base": {}, "cpt": {}}
    for lang, s in assistant.items():
        if domains.get(lang) == "new":
            out["base"][f"sft_heldout_{lang}"] = {"bpb": s["cpt_bpb"], "bytes": s["bytes"], "domain": "new"}
            out["cpt"][f"sft_heldout_{lang}"] = {"bpb": s["sft_bpb"], "bytes": s["bytes"], "domain": "new"}
    for name, s in plain.get("cpt", {}).items():
        if s["domain"] == "old" and math.isfinite(s["bpb"]):
            out["base"][name] = {"bpb": s["bpb"], "bytes": s["bytes"], "domain": "old"}
            out["cpt"][name] = {"bpb": plain["sft"][name]["bpb"], "bytes": s["bytes"], "domain": "old"}
    return out


def apply_gate(params: dict, gate_cfg: dict, eval_like: dict, tracker, model_dir: Path, model_name: str) -> dict:
    """``cpt.ops.gate``'s decision and registry steps under the SFT model's own registered name."""
    return gate.promote({**params, "gate": gate_cfg}, eval_like, tracker, model_dir, model_name)
