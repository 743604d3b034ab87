"""Old-language exactness, proved by encoding: the fixed point both base families end the choice with.

The analytic pruning (``spm_extend.old_conflicts``, ``bpe_extend.old_pairs``) removes the new pieces that the base's
segmentation of the chooser text makes possible; the guard removes likely trouble on text nobody has seen. This
module then CHECKS the result the way training uses it: the chooser's old-language documents are encoded whole (with
their newlines, tabs and leading spaces, through the same ``tokenizer.json`` the shards stage loads) and line by line,
by the base and by the extended tokenizer. Every text whose ids differ names the new tokens that fired in it; those
pieces are pruned (with whatever becomes unreachable) and the check repeats until nothing changes: a fixed point,
where the extended tokenizer encodes every chooser document and line exactly like the base.

Only texts that changed in the previous round are re-encoded: a text the larger piece set leaves alone cannot change
under a subset of it (new pieces only fire where the base's final segmentation offers them; fewer pieces offer less).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

from cpt.errors import DataError

log = logging.getLogger(__name__)

Encode = Callable[[list[str]], list[list[int]]]


@dataclass
class View:
    """One way the old language is encoded: ``texts`` (documents or lines) and the base's encoder for them."""

    name: str
    texts: list[str]
    encode_base: Encode
    base_ids: list[list[int]] = field(default_factory=list)


@dataclass
class Built:
    """What ``build(kept)`` returns for one round: an encoder per view name and the token text of an id."""

    encoders: dict[str, Encode]
    token: Callable[[int], str]


def fired_tokens(base_ids: Sequence[Sequence[int]], new_ids: Sequence[Sequence[int]]) -> tuple[list[int], Counter]:
    """(indices of the texts encoded differently, how often each token id that only the extension produced occurs
    in them). A token the extension emits but the base never did on that text is a piece that fired."""
    changed: list[int] = []
    ids: Counter = Counter()
    for i, (a, b) in enumerate(zip(base_ids, new_ids)):
        if list(a) != list(b):
            changed.append(i)
            ids.update(set(b) - set(a))
    return changed, ids


def fixed_point(kept: list, build: Callable[[list], Built], views: list[View],
                prune: Callable[[list, set[str]], list], *, max_rounds: int = 50) -> tuple[list, Built, dict]:
    """Prune ``kept`` until ``build(kept)`` encodes every text of every view exactly like the base.

    ``prune(kept, tokens)`` drops the pieces (or merges) whose token text is in ``tokens`` and anything that becomes
    unreachable. Returns the final ``kept``, its ``Built`` and a summary (rounds, pruned count, the most frequent
    pruned pieces)."""
    for v in views:
        if not v.base_ids:
            v.base_ids = v.encode_base(v.texts)
    todo = {v.name: list(range(len(v.texts))) for v in views}
    pruned: Counter = Counter()
    built = build(kept)
    for rounds in range(1, max_rounds + 1):
        fired: Counter = Counter()
        for v in views:
            idx = todo[v.name]
            if not idx:
                continue
            new_ids = built.encoders[v.name]([v.texts[i] for i in idx])
            changed, ids = fired_tokens([v.base_ids[i] for i in idx], new_ids)
            todo[v.name] = [idx[i] for i in changed]
            fired.update({built.token(t): n for t, n in ids.items()})
        if not fired:
            return kept, built, {"rounds": rounds, "pruned": len(pruned),
                                 "examples": [p for p, _ in pruned.most_common(10)]}
        before = len(kept)
        kept = prune(kept, set(fired))
        pruned.update(fired)
        log.info("exactness round %d: %d texts changed, %d pieces fired, %d -> %d kept", rounds,
                 sum(len(t) for t in todo.values()), len(fired), before, len(kept))
        if len(kept) == before:
            raise DataError(f"exactness check: pieces {sorted(fired)[:10]} change old-language text but pruning "
                            "removed nothing (a change no new piece explains)")
        built = build(kept)
    raise DataError(f"exactness check did not reach a fixed point in {max_rounds} rounds")


def culprits(base_ids: Sequence[Sequence[int]], new_ids: Sequence[Sequence[int]], token: Callable[[int], str],
             top: int = 10) -> tuple[list[int], list[str]]:
    """(changed text indices, the pieces that fired in them, most frequent first): what strict mode names."""
    changed, ids = fired_tokens(base_ids, new_ids)
    return changed, [token(t) for t, _ in ids.most_common(top)]
