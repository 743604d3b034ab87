"""reports/eval/: a one-page markdown report a person can read at a glance, the samples, a CSV for `dvc plots`,
and one figure (training loss old vs new; bits per byte per source, base vs cpt).

matplotlib is imported lazily: the eval path must run on a box with only the training dependencies; there the
report is written without the figure and says so.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

from cpt.evaluation.figures import write_figure
from cpt.io import atomic_open
from cpt.ops.verdict import END, START

log = logging.getLogger("cpt.stages.eval")

def read_curve(path: Path) -> dict[str, list[float]]:
    """Columns of metrics/train_curve.csv as floats (blank cells -> NaN); {} when the file is absent or empty."""
    if not path.exists():
        return {}
    cols: dict[str, list[float]] = {}
    with path.open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            for key, value in row.items():
                if key is None:
                    continue
                try:
                    cols.setdefault(key, []).append(float(value) if value not in (None, "") else math.nan)
                except ValueError:
                    cols.setdefault(key, []).append(math.nan)
    return cols if cols.get("step") else {}


def _f(x: float, nd: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _signed(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:+.4f}"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def write_all(
    out_dir: Path, *, metrics: dict, sources: list, scores: dict, samples: dict, models: dict,
    curve: Path, cfg: dict,
) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        {"source": s.name, "lang": s.lang, "domain": s.domain, "origin": s.origin, "docs": len(s.texts),
         "available": s.available, "truncated": s.truncated, "bytes": scores["base"][s.name].bytes,
         "base": scores["base"][s.name].bpb, "cpt": scores["cpt"][s.name].bpb,
         "tok_base": scores["base"][s.name].tokens, "tok_cpt": scores["cpt"][s.name].tokens}
        for s in sources
    ]
    # Long format for `dvc plots` (one bar per source and model).
    with atomic_open(out_dir / "bpb.csv") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["label", "source", "lang", "domain", "model", "bpb"])
        for r in rows:
            for model in ("base", "cpt"):
                w.writerow([f"{r['source']} {model}", r["source"], r["lang"], r["domain"], model, round(r[model], 6)])

    curve_cols = read_curve(curve)
    figure_note = write_figure(out_dir / "loss_curves.png", curve_cols, rows)
    if figure_note:
        log.warning(figure_note)
    (out_dir / "samples.md").parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out_dir / "samples.md") as fh:
        fh.write(samples_markdown(samples, cfg, models))
    with atomic_open(out_dir / "report.md") as fh:
        fh.write(report_markdown(metrics, rows, models, cfg, figure_note, curve, bool(curve_cols)))


def measure(domain: str, base: float, cpt: float) -> tuple[str, float]:
    """(name, value) in cpt's one sign: new-domain ``gain = bpb(base) - bpb(cpt)``, old-domain ``forgetting =
    bpb(cpt) - bpb(base)``; both > 0 mean what they say (learned / forgotten)."""
    return ("gain", base - cpt) if domain == "new" else ("forgetting", cpt - base)


def report_markdown(metrics: dict, rows: list[dict], models: dict, cfg: dict, figure_note: str | None,
                    curve: Path, has_curve: bool) -> str:
    L = ["# cpt eval: base vs continually pretrained", ""]
    gain, forg = metrics["gain"], metrics["forgetting"]
    gci, fci = metrics.get("gain_ci95", {}), metrics.get("forgetting_ci95", {})
    head = [f"**{lang}** gain {_signed(v)} {_ci(gci.get(lang))}" for lang, v in gain.items()]
    head += [f"**{lang}** forgetting {_signed(v)} {_ci(fci.get(lang))}" for lang, v in forg.items()]
    L += ["One sign convention, as everywhere in cpt (metrics, README, MLflow, Prefect): on new-language text "
          "**gain = bpb(base) - bpb(cpt), > 0 = learned**; on old-language text **forgetting = bpb(cpt) - bpb(base), "
          "> 0 = forgotten**. Brackets: 95% bootstrap interval (paired, documents resampled within each source, "
          f"{metrics.get('bootstrap', {}).get('resamples', 'n/a')} resamples, seeded).", "",
          "At a glance: " + "; ".join(head) + ".", "",
          "Bits per UTF-8 byte (bpb) compare models with different tokenizers. Per language: pooled over all sources "
          "of that language (summed NLL / summed bytes).", ""]
    by_lang = metrics.get("bpb_by_lang", {})
    L += ["| language | domain | base bpb | cpt bpb | measure | value | 95% interval |", "|---|---|---:|---:|---|---:|---|"]
    for key, domain in (("gain", "new"), ("forgetting", "old")):
        for lang, v in metrics[key].items():
            ci = metrics.get(f"{key}_ci95", {}).get(lang)
            L.append(f"| {lang} | {domain} | {_f(by_lang.get('base', {}).get(lang))} | "
                     f"{_f(by_lang.get('cpt', {}).get(lang))} | {key} | {_signed(v)} | {_ci(ci)} |")
    L += ["", "## Promotion gate", "", START, "", "(written by the gate after eval: metrics/gate.json)", "", END]
    L += ["", "| model | folder | parameters | vocab | window / stride |", "|---|---|---:|---:|---|"]
    for name, m in models.items():
        L.append(f"| {name} | `{m['path']}` | {m['params'] / 1e6:.2f}M | {m['vocab']} | {m['max_length']} / {m['stride']} |")
    L += ["", "## Bits per byte per source", "",
          "| source | lang | domain | units | documents | bytes | base bpb | cpt bpb | measure | value | 95% interval "
          "| width | tokens/byte base | tokens/byte cpt |",
          "|---|---|---|---:|---:|---:|---:|---:|---|---:|---|---:|---:|---:|"]
    per_source = metrics.get("sources", {})
    for r in rows:
        docs = f"{r['docs']}" + (f" of {r['available']}" if r["available"] != r["docs"] else "")
        entry = per_source.get(r["source"], {})
        name, value = measure(r["domain"], r["base"], r["cpt"])
        ci = entry.get(f"{name}_ci95")
        width = "n/a" if not ci else f"{ci[1] - ci[0]:.4f}"
        L.append(
            f"| {r['source']} | {r['lang']} | {r['domain']} | {docs} | {entry.get('documents', 'n/a')} | "
            f"{r['bytes']:,} | {_f(r['base'])} | "
            f"{_f(r['cpt'])} | {name} | {_signed(value)} | {_ci(ci)} | {width} | "
            f"{r['tok_base'] / max(1, r['bytes']):.3f} | {r['tok_cpt'] / max(1, r['bytes']):.3f} |"
        )
    L += ["", "Per-token loss and perplexity (each model's own tokenizer) are in `metrics/eval.json`.", ""]
    L += ["Downstream tasks (ARC, PIQA, COPA, WinoGrande, LAMBADA, Belebele, XCOPA; lm-evaluation-harness): the "
          "`downstream` stage, `reports/downstream.md`.", ""]
    L += ["## Training curves", ""]
    if figure_note:
        L += [f"No figure: {figure_note}.", ""]
    else:
        L += ["![loss curves](loss_curves.png)", ""]
        if not has_curve:
            L += [f"(`{curve.parent.name}/{curve.name}` was not found: the left panel is empty.)", ""]
    ov = metrics.get("overlap", {})
    L += ["## Contamination check", ""]
    if ov.get("enabled"):
        L += [f"{ov['eval_docs_indexed']:,} evaluation and {ov['heldout_docs_indexed']:,} held-out documents looked up "
              f"in {ov['train_records_checked']:,} training records and {ov['shard_docs_checked']:,} documents decoded "
              f"from the training shards ({ov['shard_tokens_checked']:,} tokens): "
              f"{ov['eval_docs_in_train_records'] + ov['eval_docs_in_train_shards']} evaluation and "
              f"{ov['heldout_docs_in_train_shards']} held-out documents found in training data.", ""]
    else:
        L += ["Disabled (eval.overlap.enabled: false).", ""]
    L += ["## Method", "",
          "- Text is encoded exactly as the training shards encode it (special-token strings such as a literal "
          "`<unk>` stay text). Units are scored separately, each prefixed by the token that precedes a document in "
          "the shards (BOS, else EOS); no EOS is scored. "
          "Sliding windows (window / stride per model in the table above; capped by the model's positions): each "
          "token is scored once, with at least window - stride tokens of context after the first window.",
          f"- bpb = sum of NLL (nats) / (ln 2 x UTF-8 bytes of the scored units). Units: documents cut at line ends "
          f"into pieces of at most unit_bytes={cfg['unit_bytes']}; per source a seeded uniform sample of units, "
          f"spread over the whole source, up to max_bytes={cfg['max_bytes']} (old-domain sources: "
          f"max_bytes_old={cfg.get('max_bytes_old')}; max_docs={cfg['max_docs']} units).",
          "- Generations: [samples.md](samples.md). Numbers: `metrics/eval.json`; plots: `dvc plots show`.", ""]
    return "\n".join(L)


# Below this many parameters a causal LM's greedy continuation is a loop or nothing; bits per byte still measure it.
MIN_GENERATIVE_PARAMS = 100_000_000


def degenerate(text: str) -> str | None:
    """Why a continuation is not text ("empty", "one character repeated", "a loop"), or None. A loop: from a third
    of the way in, 70% of the characters equal the one a fixed period earlier (``the same other, and the same...``)."""
    t = " ".join(text.split())
    if not t.strip():
        return "empty"
    if len(t) > 3 and max(t.count(c) for c in set(t)) >= 0.8 * len(t):
        return "one character repeated"
    tail = t[len(t) // 3:]
    for period in range(2, len(tail) // 3 + 1):
        pairs = len(tail) - period
        if pairs >= 12 and sum(tail[i] == tail[i + period] for i in range(pairs)) >= 0.7 * pairs:
            return "a loop"
    return None


def samples_warning(samples: dict[str, list[dict[str, str]]], models: dict | None) -> str | None:
    """The warning samples.md opens with when the models are too small to generate text, or most samples are not."""
    sizes = {name: m.get("params") for name, m in (models or {}).items() if isinstance(m.get("params"), (int, float))}
    texts = [row[mode] for rows in samples.values() for row in rows for mode in ("greedy", "sampled") if mode in row]
    bad = sum(1 for t in texts if degenerate(t))
    small = sizes and max(sizes.values()) < MIN_GENERATIVE_PARAMS
    if not small and bad * 2 < max(1, len(texts)):
        return None
    size = ", ".join(f"{n} {p / 1e6:.1f}M" for n, p in sizes.items())
    return (f"**Warning: these models are too small to generate text** ({size} parameters; fluent text needs "
            f"roughly {MIN_GENERATIVE_PARAMS // 1_000_000}M or more). {bad} of {len(texts)} continuations below are "
            "empty or a repeated pattern (marked). They show that generation runs end to end, not what the model "
            "learned: read the bits per byte in report.md for that.") if small else (
        f"**Warning: {bad} of {len(texts)} continuations are empty or a repeated pattern** (marked below).")


def samples_markdown(samples: dict[str, list[dict[str, str]]], cfg: dict, models: dict | None = None) -> str:
    s = cfg["samples"]
    L = ["# Generation samples", "",
         f"Greedy, and sampled with temperature {s['temperature']}, top-p {s['top_p']}, seed fixed; "
         f"{s['max_new_tokens']} new tokens at most. The prompt is in bold.", ""]
    if not samples:
        return "\n".join(L + ["(samples disabled)", ""])
    warning = samples_warning(samples, models)
    if warning:
        L += [f"> {warning}", ""]
    base = samples.get("base", [])
    cpt = samples.get("cpt", [])
    for i, row in enumerate(base):
        L += [f"## [{row['lang']}] {row['prompt']}", ""]
        for name, rows in (("base", base), ("cpt", cpt)):
            if i < len(rows):
                for mode in ("greedy", "sampled"):
                    text = " ".join(rows[i][mode].split())
                    why = degenerate(rows[i][mode])
                    L.append(f"- **{name}, {mode}:** **{row['prompt']}** {text}" + (f" *({why})*" if why else ""))
        L.append("")
    return "\n".join(L)
