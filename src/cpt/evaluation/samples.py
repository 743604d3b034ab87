"""Generations from fixed prompts, greedy and sampled, so a person can read what the new model does in each language.

The sampled continuation reseeds torch with the run's seed before every prompt, so a rerun (or the other model)
draws from the same random stream: samples are reproducible for a fixed seed on the same device.
"""

from __future__ import annotations

import torch

from cpt.device import autocast
from cpt.evaluation.models import LoadedModel


@torch.no_grad()
def generate(
    lm: LoadedModel,
    prompts: dict[str, list[str]],
    *,
    max_new_tokens: int = 48,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
) -> list[dict[str, str]]:
    """``[{"lang", "prompt", "greedy", "sampled"}]`` in prompt order; continuations exclude the prompt."""
    eos = lm.tokenizer.eos_token_id
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    out = []
    for lang, texts in prompts.items():
        for text in texts:
            ids = torch.tensor([[lm.prefix_id, *lm.encode([text])[0]]], device=lm.device)
            mask = torch.ones_like(ids)
            row = {"lang": lang, "prompt": text}
            for mode in ("greedy", "sampled"):
                kwargs = dict(do_sample=False) if mode == "greedy" else dict(
                    do_sample=True, temperature=temperature, top_p=top_p, top_k=0
                )
                torch.manual_seed(seed)
                with autocast(lm.device, lm.amp_dtype):
                    gen = lm.model.generate(
                        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                        pad_token_id=pad, eos_token_id=eos, **kwargs,
                    )
                row[mode] = lm.tokenizer.decode(gen[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
            out.append(row)
    return out
