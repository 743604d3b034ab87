"""The tokenizer stage's measurements and report: fertility per language, old-language invariance, round trip and HF
parity, all on ``role: eval`` text; written to metrics/tokenizer.json and reports/fertility.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cpt.data.records import iter_docs, select_sources
from cpt.io import atomic_open
from cpt.layout import Layout
from cpt.progress import progress
from cpt.tok import exact
from cpt.tok import fertility as fert
from cpt.tok.sampling import _lines, eval_docs, eval_lines


def evaluate(result: Any, cfg: dict[str, Any], langs: list[str], layout: Layout) -> tuple[dict[str, Any], list[str]]:
    """Every number on role: eval text: fertility per language, old-language invariance, round trip, HF parity.
    Returns the metrics and the first changed old-language lines (for the report)."""
    limit = cfg["check_lines"]
    eval_langs: list[str] = []
    for s in select_sources(layout.clean, role="eval"):
        if s.lang not in eval_langs:
            eval_langs.append(s.lang)
    languages: dict[str, dict[str, float]] = {}
    rt_fail = rt_base = hf_fail = checked = 0
    for lang in progress(eval_langs, desc="tokenizer eval", unit="lang"):
        lines = eval_lines(layout.clean, lang, 0)
        if not lines:
            continue
        b = fert.fertility(lines, lang, result.encode_base)
        n = fert.fertility(lines, lang, result.encode)
        languages[lang] = {
            "lines": n.lines, "words": n.words,
            "tokens_per_word_base": round(b.tokens_per_word, 4), "tokens_per_word": round(n.tokens_per_word, 4),
            "chars_per_token_base": round(b.chars_per_token, 4), "chars_per_token": round(n.chars_per_token, 4),
        }
        sample = lines[:limit] if limit else lines
        rt_fail += len(fert.roundtrip_failures(sample, result.encode_hf, result.decode_hf))
        rt_base += len(fert.roundtrip_failures(sample, result.encode_base, result.decode_base))
        hf_fail += len(fert.changed_lines(sample, result.encode, result.encode_hf))
        checked += len(sample)
    old = [line for s in select_sources(layout.clean, role="eval", domain="old")
           for line in _lines(iter_docs(layout.clean, role="eval", domain="old", name=s.name))]
    # Text that quotes the new language (an English paragraph naming Trần Hưng Đạo: a letter from a Unicode block the
    # old chooser text never writes) is expected to use new pieces; the guarantee and strict mode cover the rest.
    in_old = result.extra.get("in_old_letters") or (lambda _text: True)
    base_ids, new_ids = result.encode_base(old), result.encode(old)
    keep = [i for i, line in enumerate(old) if in_old(line)]
    changed, line_pieces = exact.culprits([base_ids[i] for i in keep], [new_ids[i] for i in keep], result.token)
    quoting_changed = sum(a != b for i, (a, b) in enumerate(zip(base_ids, new_ids)) if not in_old(old[i]))
    changed = [keep[i] for i in changed]
    # whole documents, as the shards stage encodes them: a word after a newline, a tab or leading spaces has no
    # dummy-prefix "▁" and tokenizes differently from the same word mid-line
    all_docs = eval_docs(layout.clean, domain="old")
    docs = [d for d in all_docs if in_old(d)]
    changed_docs, doc_pieces = exact.culprits(result.encode_docs_base(docs), result.encode_docs(docs), result.token)
    pieces = list(dict.fromkeys(line_pieces + doc_pieces))[:10]
    return {
        "base_kind": result.kind,
        "base_vocab": result.base_vocab,
        "added": len(result.added),
        "vocab": result.base_vocab + len(result.added),
        "new_languages": ",".join(langs),  # a string: DVC metrics are scalars
        "candidates": result.candidates,
        "pruned_exact": result.pruned_exact,
        "pruned_guard": result.pruned_guard,
        "pruned_unreachable": result.pruned_unreachable,
        "old_language_lines": len(keep),
        "old_language_changed_lines": len(changed),
        "old_language_docs": len(docs),
        "old_language_changed_docs": len(changed_docs),
        "old_language_changed_pieces": " ".join(pieces),  # a string: DVC metrics are scalars
        "quoting_new_language_lines": len(old) - len(keep),  # eval lines with a letter the chooser never writes
        "quoting_new_language_changed_lines": quoting_changed,
        "quoting_new_language_docs": len(all_docs) - len(docs),
        "chooser_docs": result.extra.get("chooser_docs", 0),
        "chooser_lines": result.extra.get("chooser_lines", 0),
        **{k: result.extra[k] for k in ("lexicon_forms", "lexicon_conflicts") if k in result.extra},
        "pruned_verified": result.pruned_verified,
        "exact_rounds": result.exact_rounds,
        "guarantee": guarantee(result, len(changed), len(changed_docs)),
        "roundtrip_lines": checked,
        "roundtrip_failures": rt_fail,
        "roundtrip_failures_base": rt_base,  # a lossy base normaliser (NFKC, whitespace collapse) fails some too
        "hf_mismatch_lines": hf_fail,
        "languages": languages,
    }, [old[i][:200] for i in changed[:5]]


def guarantee(result: Any, changed_lines: int, changed_docs: int) -> str:
    """What the extension promises the old language, in one sentence for metrics/tokenizer.json and the report."""
    held = ("and on every held-out eval line and document written in the old language's letters"
            if not changed_lines and not changed_docs else
            f"but NOT on held-out eval text ({changed_lines} lines, {changed_docs} documents change)")
    return (f"same ids as the base on every chooser document ({result.extra.get('chooser_docs', 0)}, encoded whole as "
            f"the shards stage does) and line ({result.extra.get('chooser_lines', 0)}), verified by encoding, "
            + held)


def write_report(metrics: dict[str, Any], changed_examples: list[str], result: Any, layout: Layout) -> None:
    m = metrics
    base_file = Path(result.base_file)
    if base_file.is_relative_to(layout.root):  # a committed report names no machine's absolute path
        base_file = base_file.relative_to(layout.root)
    text = [
        "# Tokenizer extension: fertility and old-language invariance\n",
        f"Base: `{base_file}` ({result.kind}, {m['base_vocab']} tokens). Added {m['added']} pieces for "
        f"{m['new_languages'].replace(',', ', ')} -> vocab {m['vocab']} (train pads the embedding matrix).\n",
        f"Candidates {m['candidates']}: pruned {m['pruned_exact']} that fire on the old-language training text, "
        f"{m['pruned_guard']} by the held-out guard, {m['pruned_unreachable']} unreachable.\n",
        "## Fertility on role: eval text\n",
        fert.table(m["languages"]),
        "## Old language (role: eval, domain: old lines; held out from every choice)\n",
        f"- lines: {m['old_language_lines']}, changed: **{m['old_language_changed_lines']}**",
        f"- whole documents (as the shards stage encodes them): {m['old_language_docs']}, changed: "
        f"**{m['old_language_changed_docs']}**" + (f" (new pieces that fired: {m['old_language_changed_pieces']})"
                                                   if m["old_language_changed_pieces"] else ""),
        f"- guarantee: {m['guarantee']}; {m['pruned_verified']} pieces pruned by that check in "
        f"{m['exact_rounds']} rounds",
        f"- eval text quoting a new language (a letter the chooser never writes; new pieces may fire there by design): "
        f"{m['quoting_new_language_lines']} lines ({m['quoting_new_language_changed_lines']} changed), "
        f"{m['quoting_new_language_docs']} documents",
        f"- round trip decode(encode(x)) == x: {m['roundtrip_lines'] - m['roundtrip_failures']} of "
        f"{m['roundtrip_lines']} eval lines (base tokenizer: {m['roundtrip_lines'] - m['roundtrip_failures_base']})",
        f"- AutoTokenizer == merged model: {m['roundtrip_lines'] - m['hf_mismatch_lines']} of {m['roundtrip_lines']} "
        "eval lines",
    ]
    for ex in changed_examples:
        text.append(f"  - changed: `{ex}`")
    with atomic_open(layout.reports / "fertility.md") as fh:
        fh.write("\n".join(text) + "\n")
