"""The issue's proof cases for the verdict (issue 24, points 1-3), each with what the old code said.

1. Two books that forget +0.150 and +0.015: the old bootstrap resampled their 4 KB pieces as if independent and
   gave a narrow interval; whole books resampled give an interval from one book to the other, and two documents are
   "undecided: too few documents".
2. A candidate 1.0 bpb worse than the champion on Vietnamese but better on Chinese: the old gate compared one pooled
   new-domain number with the champion and promoted it; now Vietnamese alone refuses it.
3. Clear failures: forgetting in [+0.3, +0.5] and a gain in [-2.5, -1.5] were "undecided: too little eval text";
   now refused, as is a gain wholly below min_gain. An interval straddling its budget stays undecided.
"""

import math

import numpy as np
import pytest

from cpt.evaluation import record
from cpt.evaluation.uncertainty import compare
from cpt.ops import gate, verdict

LN2 = math.log(2.0)
CFG = {"scorer": 2, "max_length": 1024, "stride": 768, "batch_size": 8, "unit_bytes": 4096, "device": "cpu",
       "dtype": "fp32"}


def two_books():
    """53 units of 4 KB from two books: 27 forget +0.150 bpb, 26 forget +0.015 (a little spread per unit)."""
    rng = np.random.default_rng(0)
    book = np.array([0] * 27 + [1] * 26)
    forgetting = np.where(book == 0, 0.150, 0.015) + rng.normal(0, 0.01, len(book))
    nbytes = np.full(len(book), 4096.0)
    base_bpb = 2.5 + rng.normal(0, 0.2, len(book))
    base = base_bpb * LN2 * nbytes
    cpt = (base_bpb + forgetting) * LN2 * nbytes
    return base, cpt, nbytes, book


def test_two_books_are_two_documents_not_53_pieces():
    base, cpt, nbytes, book = two_books()
    units = [f"u{i}" for i in range(len(book))]  # the old bootstrap: every piece its own document
    by_unit = compare(base, cpt, nbytes, units, ["heldout_en"] * len(book), lang={"heldout_en": "en"}, seed=1234)
    by_book = compare(base, cpt, nbytes, book.tolist(), ["heldout_en"] * len(book), lang={"heldout_en": "en"},
                      seed=1234)
    unit_ci = [-by_unit["sources"]["heldout_en"]["ci95"][1], -by_unit["sources"]["heldout_en"]["ci95"][0]]
    book_ci = [-by_book["sources"]["heldout_en"]["ci95"][1], -by_book["sources"]["heldout_en"]["ci95"][0]]
    # before: [+0.067, +0.103] from 53 "independent" pieces; after: [+0.018, +0.149], one book to the other
    assert unit_ci[0] > 0.05 and unit_ci[1] < 0.11
    assert book_ci[0] == pytest.approx(0.015, abs=0.005) and book_ci[1] == pytest.approx(0.150, abs=0.005)
    assert by_book["sources"]["heldout_en"]["documents"] == 2 and by_book["sources"]["heldout_en"]["units"] == 53
    assert by_book["bootstrap"]["unit"] == "document"
    # the gate on two documents: too few to decide either way
    v = verdict.judge("forgetting", 0.083, book_ci, 0.05, documents=2, min_documents=5)
    assert v["decision"] == "undecided" and v["reason"].startswith("undecided: too few documents")


def test_a_candidate_worse_on_vietnamese_is_refused_even_when_chinese_improves_more():
    # candidate vs champion: Vietnamese 1.0 bpb worse, Chinese 1.5 bpb better; the pooled new-domain number gains
    params = {"ingest": {"sources": [
        {"name": "ntrex_vi", "lang": "vi", "domain": "new", "role": "eval"},
        {"name": "ntrex_zh", "lang": "zh", "domain": "new", "role": "eval"},
        {"name": "ntrex_en", "lang": "en", "domain": "old", "role": "eval"}]},
        "gate": {"min_gain": 0.02, "max_forgetting": 0.05}}
    table = {"ntrex_vi": ("new", "vi", 3.0, 2.0, 8.0), "ntrex_zh": ("new", "zh", 4.0, 5.5, 18.0),
             "ntrex_en": ("old", "en", 3.0, 3.0, 3.0)}  # candidate, champion, base bpb

    def rec(col):
        out = {}
        for name, (domain, lang, *bpb) in table.items():
            spread = [0.02 * ((i * 7) % 5 - 2) for i in range(40)]
            out[name] = record.entry(name, lang, domain, [f"{name} {i}" for i in range(40)], list(range(40)),
                                     [(bpb[col] + s) * LN2 * 100 for s in spread], [100] * 40, CFG)
        return out

    m = {"base": {}, "cpt": {}, "sources": {}, "gain": {}, "gain_ci95": {}, "forgetting": {}, "forgetting_ci95": {}}
    for name, (domain, lang, cand, _, base) in table.items():
        m["base"][name] = {"bpb": base, "bytes": 4000}
        m["cpt"][name] = {"bpb": cand, "bytes": 4000}
        kind, value = ("gain", base - cand) if domain == "new" else ("forgetting", cand - base)
        m["sources"][name] = {"lang": lang, "domain": domain, kind: value, f"{kind}_ci95": [value - 0.01, value + 0.01],
                              "documents": 40}
        m[kind][lang], m[f"{kind}_ci95"][lang] = value, [value - 0.01, value + 0.01]
    d = gate.decide(m, params, champion={"version": "7", "sources": rec(1)}, candidate=rec(0))
    c = d["vs_champion"]
    assert c["gain"] == pytest.approx(0.25)  # pooled: the old gate's one number, +0.25 >= 0.02: it promoted
    assert c["per_source"]["ntrex_vi"]["value"] == pytest.approx(-1.0) and c["per_lang"]["vi"]["decision"] == "refuse"
    assert c["per_lang"]["zh"]["decision"] == "promote" and c["per_lang"]["en"]["decision"] == "promote"
    assert d["decision"] == "refuse"
    assert "vs champion v7: lang vi: gain -1.0000, 95% interval" in d["reason"] and "wholly below" in d["reason"]


@pytest.mark.parametrize("kind, ci, budget, before", [
    ("forgetting", [0.3, 0.5], 0.05, "undecided: too little eval text"),
    ("gain", [-2.5, -1.5], 0.02, "undecided: too little eval text"),
    ("gain", [0.005, 0.015], 0.02, "refuse"),  # a gain wholly below min_gain
])
def test_clear_failures_are_refused(kind, ci, budget, before):
    v = verdict.judge(kind, sum(ci) / 2, ci, budget, documents=50, min_documents=5)
    assert v["decision"] == "refuse", before
    assert "wholly" in v["reason"]


@pytest.mark.parametrize("kind, ci, budget, decision", [
    ("forgetting", [-0.01, 0.04], 0.05, "promote"),
    ("forgetting", [0.02, 0.08], 0.05, "undecided"),  # straddles
    ("forgetting", [0.051, 0.06], 0.05, "refuse"),
    ("gain", [0.03, 0.5], 0.02, "promote"),
    ("gain", [0.01, 0.5], 0.02, "undecided"),  # straddles
    ("gain", [0.02, 0.5], 0.02, "promote"),  # the lower bound on the budget clears it
])
def test_three_outcomes(kind, ci, budget, decision):
    assert verdict.judge(kind, sum(ci) / 2, ci, budget, documents=10, min_documents=5)["decision"] == decision
    few = verdict.judge(kind, sum(ci) / 2, ci, budget, documents=4, min_documents=5)
    assert few["decision"] == "undecided" and "too few documents" in few["reason"]
