"""Sliding-window log-likelihood of whole documents: loss, perplexity and bits per UTF-8 byte.

Per-token loss depends on the tokenizer; bits per byte does not: the summed negative log-likelihood of a text is
(up to tokenization ambiguity) ``-log P(text)`` under the model whatever its vocabulary, and dividing by the text's
UTF-8 bytes makes it comparable between the base model and the vocabulary-extended cpt model.

    bpb = sum of NLL in nats over every scored token / (ln 2 * UTF-8 bytes of the scored documents)

Decisions, in one place:
- Documents are scored separately (never concatenated), each as ``[prefix] + tokens`` where prefix is BOS (or EOS
  when there is no BOS, see ``models``); every document token is scored exactly once, no EOS is scored, and the bytes
  are those of the whole document text as stored in the record.
- Long documents use the strided sliding window (the HF perplexity recipe, made exact at the edges): the first window
  scores all its tokens; each later window is the ``max_length`` tokens ending at the last new target and scores only
  the ``stride`` targets the previous window did not, so every scored token after the first window sees at least
  ``max_length - stride`` tokens of context. ``stride`` must be < ``max_length`` (a window must keep one token of
  context before its first new target; HF's recipe with stride == max_length silently skips one token per window).
- A document that fits in ``max_length`` is one forward pass over the full context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cpt.device import autocast
from cpt.evaluation.models import LoadedModel
from cpt.progress import progress

LN2 = math.log(2.0)


@dataclass
class Score:
    """Summed NLL over a set of documents; everything else derives from the three sums."""

    nll: float = 0.0  # nats, summed over scored tokens
    tokens: int = 0  # scored tokens (this model's tokenizer)
    bytes: int = 0  # UTF-8 bytes of the scored documents
    docs: int = 0
    # per document, in input order (what the bootstrap resamples, cpt.evaluation.uncertainty); not in to_dict
    doc_nll: tuple[float, ...] = ()
    doc_bytes: tuple[int, ...] = ()

    def add(self, other: "Score") -> "Score":
        return Score(self.nll + other.nll, self.tokens + other.tokens, self.bytes + other.bytes, self.docs + other.docs,
                     self.doc_nll + other.doc_nll, self.doc_bytes + other.doc_bytes)

    @property
    def loss(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 700.0)) if self.tokens else float("nan")

    @property
    def bpb(self) -> float:
        return self.nll / (LN2 * self.bytes) if self.bytes else float("nan")

    def to_dict(self) -> dict:
        return {
            "loss": round(self.loss, 6),
            "ppl": round(self.ppl, 4),
            "bpb": round(self.bpb, 6),
            "bytes": self.bytes,
            "tokens": self.tokens,
            "docs": self.docs,
            "nll_nats": round(self.nll, 4),
        }


@dataclass(frozen=True)
class Window:
    doc: int
    begin: int  # window = ids[begin:end]
    end: int
    first: int  # first target position scored in this window (targets are positions 1..n-1 of ids)


def plan_windows(n: int, max_length: int, stride: int, doc: int = 0) -> list[Window]:
    """Windows over a sequence of ``n`` ids (ids[0] is the prefix token); targets 1..n-1 each scored exactly once."""
    if max_length < 2:
        raise ValueError("max_length must be >= 2")
    if not 1 <= stride < max_length:
        raise ValueError(f"stride must be in [1, max_length); got stride={stride}, max_length={max_length}")
    if n < 2:
        return []
    end = min(max_length, n)
    windows = [Window(doc, 0, end, 1)]
    while end < n:
        first, end = end, min(end + stride, n)
        windows.append(Window(doc, max(0, end - max_length), end, first))
    return windows


@dataclass
class BpbScorer:
    """Scores documents with one model. ``batch_size`` windows per forward pass (right-padded, attention-masked)."""

    lm: LoadedModel
    max_length: int = 512
    stride: int = 256
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.lm.max_positions and self.max_length > int(self.lm.max_positions):
            # The model cannot see the requested window: shrink it, and the stride in proportion, so the context
            # overlap keeps its intended share instead of collapsing to one token.
            capped = int(self.lm.max_positions)
            self.stride = max(1, self.stride * capped // self.max_length)
            self.max_length = capped
        self.stride = max(1, min(self.stride, self.max_length - 1))

    def doc_nll(self, texts: list[str], desc: str = "") -> list[tuple[float, int]]:
        """(NLL nats, scored tokens) per document, in input order."""
        seqs = [[self.lm.prefix_id, *ids] for ids in self.lm.encode(texts)]
        windows = [w for i, s in enumerate(seqs) for w in plan_windows(len(s), self.max_length, self.stride, i)]
        return self.score_windows(seqs, windows, desc)

    def score_windows(self, seqs: list[list[int]], windows: list[Window], desc: str = "") -> list[tuple[float, int]]:
        """(NLL nats, scored tokens) per sequence, summed over its windows. Also used by XCOPA (one window each)."""
        # Longest first: batches of similar lengths waste little padding; the result does not depend on the order.
        windows.sort(key=lambda w: w.end - w.begin, reverse=True)
        nll = [0.0] * len(seqs)
        tokens = [0] * len(seqs)
        batches = [windows[i : i + self.batch_size] for i in range(0, len(windows), self.batch_size)]
        for batch in progress(batches, desc=f"{self.lm.name} {desc}".strip(), unit="batch", leave=False):
            for w, (s, t) in zip(batch, self._score_batch(batch, seqs)):
                nll[w.doc] += s
                tokens[w.doc] += t
        return list(zip(nll, tokens))

    @torch.no_grad()
    def _score_batch(self, batch: list[Window], seqs: list[list[int]]) -> list[tuple[float, int]]:
        width = max(w.end - w.begin for w in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        targets = torch.full((len(batch), width), -100, dtype=torch.long)
        for b, w in enumerate(batch):
            window = seqs[w.doc][w.begin : w.end]
            ids[b, : len(window)] = torch.tensor(window)
            mask[b, : len(window)] = 1
            # logits at position j predict ids[begin + j + 1]; keep only targets in [first, end)
            lo = w.first - 1 - w.begin
            targets[b, lo : len(window) - 1] = torch.tensor(seqs[w.doc][w.first : w.end])
        dev = self.lm.device
        with autocast(dev, self.lm.amp_dtype):
            logits = self.lm.model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
        nll = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.to(dev).reshape(-1), reduction="none"
        ).reshape(len(batch), width)
        sums = nll.double().sum(dim=1).tolist()
        counts = (targets != -100).sum(dim=1).tolist()
        return list(zip(sums, counts))

    def score(self, texts: list[str], desc: str = "") -> Score:
        """Summed score over documents; empty documents (no tokens) contribute nothing and are not counted."""
        total = Score()
        for text, (nll, n) in zip(texts, self.doc_nll(texts, desc)):
            if n:
                nbytes = len(text.encode("utf-8"))
                total = total.add(Score(nll, n, nbytes, 1, (nll,), (nbytes,)))
        return total
