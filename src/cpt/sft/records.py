"""The sft gate's per-unit records and its champion re-scorer: the same pairing as eval's gate (``cpt.ops.champion``).

An sft candidate is judged against the current ``cpt-sft`` champion on exactly the units it was judged on against
the CPT model: each held-out conversation of a gated (new-domain) language (its assistant tokens; a conversation is
its own document) and each plain-text unit of the old-domain sources (eval's units and documents). Without a
re-scorer, a champion judged on another held-out set could never be compared again and every later candidate was
refused; ``rescorer`` scores a downloaded champion on the candidate's units with the champion's own tokenizer and
chat template (the gate deletes the copy afterwards).

Conversation units are stored in the held-out examples' order (not the packing order, which depends on the
tokenizer), labelled by the example id, and hashed over their messages and the scoring configuration
(``cpt.evaluation.record``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cpt.device import autocast_dtype, pick_device
from cpt.evaluation import record
from cpt.evaluation.bpb import BpbScorer
from cpt.evaluation.models import load_model
from cpt.evaluation.sources import collect_sources
from cpt.sft import intervals, template
from cpt.sft.packing import pack, plan

PLAIN_KEYS = ("sources", "max_docs", "max_bytes", "max_bytes_old", "heldout", "unit_bytes")


def configs(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(assistant, plain) scoring configurations: what besides the text decides a unit's NLL."""
    dev = pick_device(cfg["device"])
    amp = autocast_dtype(dev, "auto")
    dtype = None if amp is None else str(amp).removeprefix("torch.")
    chat = {"scorer": record.SCORER, "kind": "sft assistant tokens", "max_length": cfg["max_length"],
            "micro_batch": cfg["micro_batch"], "loss_chunk": cfg["loss_chunk"], "device": dev.type,
            "dtype": dtype or "fp32"}
    return chat, record.scoring_config(cfg["plain_eval"], dev.type, dtype)


def unit_text(example: dict[str, Any]) -> str:
    return json.dumps(example["messages"], ensure_ascii=False, sort_keys=True)


def span_order(encoded: list, length: int) -> list[int]:
    """The example index of each of ``pack``'s spans (``pack`` lays examples out by ``plan``)."""
    return [i for members in plan([len(e.ids) - 1 for e in encoded], length) for i in members]


def assistant_entry(name: str, lang: str, domain: str, examples: list[dict], encoded: list, length: int,
                    span_nll: np.ndarray, config: dict[str, Any]) -> dict[str, Any]:
    """One held-out language's record entry from per-span NLL (``intervals.conversation_nll``) in example order."""
    order = span_order(encoded, length)
    nll = np.zeros(len(examples))
    nll[order] = span_nll
    return record.entry(name, lang, domain, [unit_text(ex) for ex in examples], [ex["id"] for ex in examples],
                        nll.tolist(), [e.assistant_bytes for e in encoded], config)


def candidate(cfg: dict[str, Any], heldout: dict[str, tuple[list[dict], list]], scored: dict[str, Any],
              domains: dict[str, str]) -> dict[str, dict]:
    """The SFT model's record on what its gate judges: new-domain held-out conversations and old-domain plain text.
    ``heldout``: lang -> (examples, their encodings) in packing input order; ``scored``: ``evaluate.score_models``."""
    chat, plain = configs(cfg)
    out = {}
    for lang, (examples, encoded) in sorted(heldout.items()):
        if domains.get(lang, "new") == "new":
            out[f"sft_heldout_{lang}"] = assistant_entry(f"sft_heldout_{lang}", lang, "new", examples, encoded,
                                                         int(cfg["max_length"]), scored["units"]["sft"][lang], chat)
    old = [s for s in scored["sources"] if s.domain == "old"]
    out.update(record.of_scores(old, scored["scores"]["sft"], plain))
    return out


def rescorer(layout: Any, cfg: dict[str, Any], seed: int, heldout: dict[str, tuple[list[dict], list]],
             domains: dict[str, str]) -> Callable[[Path], dict[str, dict]]:
    """``rescore(folder) -> record``: a champion scored on the candidate's units (for ``cpt.ops.gate.promote``)."""
    chat, plain = configs(cfg)

    def rescore(folder: Path) -> dict[str, dict]:
        lm = load_model("champion", Path(folder), device=cfg["device"])
        tok = lm.tokenizer
        text, _ = template.choose_template(tok, cfg["chat_template"], layout.base)
        tok.chat_template = text
        out = {}
        for lang, (examples, _) in sorted(heldout.items()):
            if domains.get(lang, "new") != "new":
                continue
            encoded = template.encode(tok, [ex["messages"] for ex in examples])
            # every candidate unit must be scored: a conversation longer under the champion's tokenizer widens the row
            length = max([int(cfg["max_length"])] + [len(e.ids) - 1 for e in encoded])
            split = pack(f"champion/{lang}", encoded, length, tok.eos_token_id)
            nll = intervals.conversation_nll(lm, split, int(cfg["micro_batch"]), int(cfg["loss_chunk"]))
            out[f"sft_heldout_{lang}"] = assistant_entry(f"sft_heldout_{lang}", lang, "new", examples, encoded,
                                                         length, nll, chat)
        sources = [s for s in collect_sources(layout, {k: cfg["plain_eval"][k] for k in PLAIN_KEYS}, seed)
                   if s.domain == "old"]
        pe = cfg["plain_eval"]
        scorer = BpbScorer(lm, int(pe["max_length"]), int(pe["stride"]), int(pe["batch_size"]))
        out.update(record.of_scores(sources, {s.name: scorer.score(s.texts, desc=s.name) for s in sources}, plain))
        return out

    return rescore
