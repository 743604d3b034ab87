"""Does a real base load right? WikiText-2 test bits per byte of an HF folder (goal for SmolLM2-135M: 1.0-1.2),
scored by cpt's own eval path (``cpt.evaluation``: the codec's document prefix, windows of ``--max-length``); and,
with ``--chat-prefix``, short documents (NTREX English lines, where the prefix matters most) conditioned on the
codec's prefix vs on the chat marker ``<|im_end|>`` (what the codec used before issue 19).

    python bench/measure_smollm2.py --model data/base --max-bytes 200000 [--chat-prefix] [--out bench/results/x.json]

Articles are split like the ingest stage's ``unit: wikitext`` (``" = Title = "`` lines) and taken in file order
until ``--max-bytes``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TITLE = re.compile(r"^ ?= [^=].* = ?$")


def wikitext_articles(path: Path, max_bytes: int) -> list[str]:
    docs, buf = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if TITLE.match(line) and buf:
            docs.append("\n".join(buf).strip())
            buf = []
        buf.append(line)
    docs.append("\n".join(buf).strip())
    out, total = [], 0
    for d in docs:
        if d and total < max_bytes:
            out.append(d)
            total += len(d.encode("utf-8"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--corpora", type=Path, default=ROOT.parent / "shared" / "corpora")
    ap.add_argument("--max-bytes", type=int, default=200_000)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--chat-prefix", action="store_true", help="NTREX en lines: codec prefix vs <|im_end|>")
    ap.add_argument("--ntrex-lines", type=int, default=200)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import torch

    from cpt.evaluation.bpb import BpbScorer
    from cpt.evaluation.models import load_model

    torch.set_num_threads(2)
    lm = load_model("base", args.model, device="cpu")
    texts = wikitext_articles(args.corpora / "en_wikitext2" / "test.txt", args.max_bytes)
    result = {"model": str(args.model), "articles": len(texts), "bytes": sum(len(t.encode()) for t in texts),
              "max_length": args.max_length, "stride": args.stride,
              "prefix_token": lm.tokenizer.convert_ids_to_tokens(lm.prefix_id)}
    t = time.perf_counter()
    score = BpbScorer(lm, args.max_length, args.stride, 4).score(texts, desc="wikitext2")
    result["bpb"] = score.nll / math.log(2) / score.bytes
    result["tokens_per_byte"] = score.tokens / score.bytes
    result["seconds"] = round(time.perf_counter() - t, 1)
    if args.chat_prefix:
        lines = (args.corpora / "ntrex128" / "newstest2019-src.eng.txt").read_text(encoding="utf-8").splitlines()
        lines = [x for x in lines if x.strip()][: args.ntrex_lines]
        own = BpbScorer(lm, args.max_length, args.stride, 8).score(lines, desc="ntrex_en")
        lm.prefix_id = lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
        chat = BpbScorer(lm, args.max_length, args.stride, 8).score(lines, desc="ntrex_en <|im_end|>")
        result["ntrex_en_lines"] = len(lines)
        result["ntrex_en_bpb"] = own.nll / math.log(2) / own.bytes
        result["ntrex_en_bpb_prefix_im_end"] = chat.nll / math.log(2) / chat.bytes
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
