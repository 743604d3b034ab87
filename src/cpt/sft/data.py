"""Instruction data for ``sft``: read the usual formats into conversations, clean, deduplicate, decontaminate, split.

Formats (``sft.sources[].format``; ``auto`` picks by the record's keys):

    alpaca            {"instruction", "input"?, "output"}         user = instruction (+ blank line + input)
    prompt_response   {"prompt", "response"}                      (vi_alpaca)
    messages          {"messages": [{"role", "content"}, ...]}    OpenAI / HF chat format
                      {"conversations": [{"from", "value"}, ...]} ShareGPT (human/gpt/system)

Files: ``.jsonl``, ``.jsonl.gz`` (one record per line) or ``.json`` (one array). Every record becomes
``{id, source, lang, domain, role, messages}`` with roles system? then user/assistant alternating, ending on an
assistant turn. Why this lives in the sft stage and not in ingest/clean: conversations are not documents (the
record shape, the checks and the held-out rule differ) and the check that a message cannot forge a turn boundary
needs the chat template, which only exists once the model to tune is known. The text steps are clean's own
(``cpt.data.textnorm``: NFC, controls, whitespace) and so is the decontamination index (``cpt.data.decontam``).

Steps, in order; every dropped record goes to ``quarantine.jsonl`` with ``{source, file, line, id, reason, detail,
ref}``:

1. parse + convert + validate (``bad_json``, ``not_an_object``, ``unknown_format``, ``missing_field``, ``empty``,
   ``bad_roles``, ``marker``: a message containing a special token or a template marker);
2. ``max_examples`` per source, first or a seeded order-preserving uniform sample;
3. exact dedup on the normalised conversation (``exact_duplicate``, ``ref`` = the kept one);
4. split by instruction: ``eval`` iff hash(seed, first user message) < ``eval_fraction``, so the same instruction
   (even with another answer) is never on both sides; ``max_eval`` caps the eval side per language;
5. decontamination of the train side (``contaminated``) against every ``role: eval`` document in data/clean
   (NTREX, XQuAD, WikiText: 13-word / 25-character n-grams) AND against the held-out sft eval conversations and
   their instructions, so a near-copy of a held-out instruction cannot sit in training either. A held-out
   conversation shorter than one n-gram is matched as a whole token sequence (lowercased, punctuation dropped; at
   least ``SHORT_MIN`` tokens) anywhere in a training conversation, and a training instruction with the same token
   sequence as a held-out one is dropped: exact text hashes alone missed "Thủ đô của Việt Nam là gì?\nHà Nội."
   copied as "thủ đô của Việt Nam là gì\nHà Nội" (and the instruction split hashes the exact text).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from cpt.data.decontam import EvalIndex
from cpt.data.dedup import CHAR_LANGS, shingles, token_hashes
from cpt.data.records import iter_docs
from cpt.data.textnorm import nfc, normalize_whitespace, text_hash
from cpt.errors import ConfigError, DataError
from cpt.io import open_text

FORMATS = ("auto", "alpaca", "prompt_response", "messages")
# Shortest held-out item matched as a whole token sequence (words; characters for zh/ja): shorter ones ("Hi.")
# would match ordinary training text by chance.
SHORT_MIN = {"word": 4, "char": 8}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "system": "system"}
SOURCE_DEFAULTS: dict[str, Any] = {"name": None, "path": None, "format": "auto", "lang": None, "domain": "new",
                                   "max_examples": None, "sample": "first"}


class Reject(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclass
class Prepared:
    examples: list[dict] = field(default_factory=list)  # kept conversations, train and eval
    quarantine: list[dict] = field(default_factory=list)
    stats: dict[str, dict[str, int]] = field(default_factory=dict)  # per source: read, kept, train, eval, reasons


def check_sources(sources: list, corpus_dir: Path) -> list[dict]:
    """Every source resolved and checked before any work: a bad one is one line naming it."""
    from cpt.params import with_defaults

    if not sources:
        raise ConfigError("params.yaml: sft.sources is empty; list at least one instruction file")
    out, names = [], set()
    for i, raw in enumerate(sources):
        src = with_defaults(f"sft.sources[{i}]", raw, SOURCE_DEFAULTS)
        for key in ("name", "path", "lang"):
            if not src[key]:
                raise ConfigError(f"sft.sources[{i}]: '{key}' is required")
        if src["name"] in names:
            raise ConfigError(f"sft.sources[{i}]: duplicate name {src['name']!r}")
        names.add(src["name"])
        if src["format"] not in FORMATS:
            raise ConfigError(f"sft.sources[{i}] ({src['name']}): format {src['format']!r} not in {FORMATS}")
        if src["domain"] not in ("new", "old"):
            raise ConfigError(f"sft.sources[{i}] ({src['name']}): domain must be new or old (old = replay)")
        if src["sample"] not in ("first", "uniform"):
            raise ConfigError(f"sft.sources[{i}] ({src['name']}): sample must be first or uniform")
        path = Path(src["path"]).expanduser()
        src["file"] = path if path.is_absolute() else corpus_dir / path
        if not src["file"].is_file():
            raise DataError(f"sft.sources[{i}] ({src['name']}): {src['file']} not found")
        out.append(src)
    return out


def read_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, parsed JSON or a Reject) per record; a .json file is one array (line = its index + 1)."""
    name = path.name.removesuffix(".gz")
    if name.endswith(".json"):
        with open_text(path) as fh:
            try:
                data = json.load(fh)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"{path}: not a JSON file ({exc})") from exc
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json source must hold one array of records")
        yield from enumerate(data, 1)
        return
    if not name.endswith(".jsonl"):
        raise DataError(f"{path}: unknown instruction file type (expected .json, .jsonl or .jsonl.gz)")
    with open(path, "rb") as raw:
        fh = gzip.open(raw) if path.suffix == ".gz" else raw
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                yield lineno, Reject("bad_json", str(exc)[:200])


def _text(value: Any, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise Reject("missing_field", f"{key} is {type(value).__name__}, not text")
    return normalize_whitespace(nfc(value))


def to_messages(record: Any, fmt: str) -> list[dict[str, str]]:
    """One record -> normalised messages (NFC, controls, whitespace: clean's own steps)."""
    if not isinstance(record, dict):
        raise Reject("not_an_object", type(record).__name__)
    if fmt == "auto":
        fmt = ("messages" if ("messages" in record or "conversations" in record) else
               "alpaca" if "instruction" in record else "prompt_response" if "prompt" in record else "")
        if not fmt:
            raise Reject("unknown_format", f"keys {sorted(record)[:6]}")
    if fmt == "alpaca":
        if "instruction" not in record or "output" not in record:
            raise Reject("missing_field", "alpaca needs instruction and output")
        user = _text(record["instruction"], "instruction")
        extra = _text(record.get("input"), "input")
        return [{"role": "user", "content": f"{user}\n\n{extra}" if extra and user else user or extra},
                {"role": "assistant", "content": _text(record["output"], "output")}]
    if fmt == "prompt_response":
        if "prompt" not in record or "response" not in record:
            raise Reject("missing_field", "prompt_response needs prompt and response")
        return [{"role": "user", "content": _text(record["prompt"], "prompt")},
                {"role": "assistant", "content": _text(record["response"], "response")}]
    turns = record.get("messages", record.get("conversations"))
    if not isinstance(turns, list):
        raise Reject("missing_field", "messages/conversations must be a list")
    out = []
    for t in turns:
        if not isinstance(t, dict):
            raise Reject("bad_roles", "a turn is not an object")
        role = t.get("role", SHAREGPT_ROLES.get(str(t.get("from", "")).lower()))
        content = t.get("content", t.get("value"))
        out.append({"role": role, "content": _text(content, "content")})
    return out


def validate(messages: list[dict[str, str]], forbidden: tuple[str, ...]) -> None:
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body or len(body) % 2:
        raise Reject("bad_roles", f"{len(body)} non-system turns; expected user/assistant pairs")
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise Reject("bad_roles", f"turn {i} is {m['role']!r}, expected {want!r}")
    for m in messages:
        if not m["content"]:
            raise Reject("empty", f"empty {m['role']} message")
        hit = next((s for s in forbidden if s in m["content"]), None)
        if hit:
            raise Reject("marker", f"{m['role']} message contains {hit!r}")


def conversation_text(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages)


def instruction_key(messages: list[dict]) -> str:
    return next(m["content"] for m in messages if m["role"] == "user").casefold()


def in_eval(key: str, seed: int, fraction: float) -> bool:
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def _sample(rows: list, n: int | None, how: str, seed: int, name: str) -> list:
    if n is None or len(rows) <= n:
        return rows
    if how == "first":
        return rows[:n]
    keep = sorted(random.Random(f"{seed}:{name}").sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def prepare(sources: list[dict], *, seed: int, eval_fraction: float, max_eval: int | None, forbidden: tuple[str, ...],
            clean_dir: Path | None, decontam: dict) -> Prepared:
    prep = Prepared()
    seen: dict[str, str] = {}
    for src in sources:
        st = prep.stats.setdefault(src["name"], {"read": 0, "kept": 0, "train": 0, "eval": 0})
        valid = []
        for line, rec in read_records(src["file"]):
            st["read"] += 1
            rid = f"{src['name']}/{line}"
            try:
                if isinstance(rec, Reject):
                    raise rec
                messages = to_messages(rec, src["format"])
                validate(messages, forbidden)
            except Reject as rej:
                prep.quarantine.append({"source": src["name"], "file": str(src["file"]), "line": line, "id": rid,
                                        "reason": rej.reason, "detail": rej.detail, "ref": None})
                st[rej.reason] = st.get(rej.reason, 0) + 1
                continue
            valid.append({"id": rid, "source": src["name"], "lang": src["lang"], "domain": src["domain"],
                          "line": line, "messages": messages})
        for ex in _sample(valid, src["max_examples"], src["sample"], seed, src["name"]):
            key = text_hash(json.dumps(ex["messages"], ensure_ascii=False, sort_keys=True))
            if key in seen:
                _drop(prep, src, ex, "exact_duplicate", "", seen[key])
                continue
            seen[key] = ex["id"]
            ex["role"] = "eval" if in_eval(instruction_key(ex["messages"]), seed, eval_fraction) else "train"
            prep.examples.append(ex)
    if max_eval is not None:  # cap the eval side per language; the surplus is not used at all (still held out)
        counts: dict[str, int] = {}
        for ex in prep.examples:
            if ex["role"] == "eval":
                counts[ex["lang"]] = counts.get(ex["lang"], 0) + 1
                if counts[ex["lang"]] > max_eval:
                    ex["role"] = "unused"
    _decontaminate(prep, sources, clean_dir, decontam)
    for ex in prep.examples:
        if ex["role"] == "unused":
            st = prep.stats[ex["source"]]
            st["eval_unused"] = st.get("eval_unused", 0) + 1
    prep.examples = [ex for ex in prep.examples if ex["role"] != "unused"]
    for ex in prep.examples:
        st = prep.stats[ex["source"]]
        st["kept"] += 1
        st[ex["role"]] += 1
    return prep


def _token_key(text: str, lang: str) -> int | None:
    """One hash of a text's simplified token sequence (decontamination's tokens), None for a text without tokens."""
    mode = "char" if lang in CHAR_LANGS else "word"
    toks = token_hashes(text, mode)
    return int(shingles(toks.hashes(norm_numbers=False), len(toks))[0]) if len(toks) else None


def _drop(prep: Prepared, src: dict, ex: dict, reason: str, detail: str, ref: str | None) -> None:
    prep.quarantine.append({"source": ex["source"], "file": str(src["file"]), "line": ex["line"], "id": ex["id"],
                            "reason": reason, "detail": detail, "ref": ref})
    st = prep.stats[ex["source"]]
    st[reason] = st.get(reason, 0) + 1


def _decontaminate(prep: Prepared, sources: list[dict], clean_dir: Path | None, cfg: dict) -> None:
    if not cfg.get("enabled", True):
        return
    index = EvalIndex(word_ngram=int(cfg.get("word_ngram", 13)), char_ngram=int(cfg.get("char_ngram", 25)),
                      short_min=dict(SHORT_MIN))
    held: dict[int | None, str] = {}  # held-out instructions by their token sequence (case, punctuation dropped)
    if clean_dir is not None:
        for doc in iter_docs(clean_dir, role="eval"):
            index.add(doc["text"], doc["lang"], doc["source"], doc["id"])
    for ex in prep.examples:
        if ex["role"] in ("eval", "unused"):
            index.add(conversation_text(ex["messages"]), ex["lang"], "sft_eval", ex["id"])
            held.setdefault(_token_key(instruction_key(ex["messages"]), ex["lang"]), ex["id"])
    index.build()
    by_name = {s["name"]: s for s in sources}
    kept = []
    for ex in prep.examples:
        if ex["role"] == "train":
            same = held.get(_token_key(instruction_key(ex["messages"]), ex["lang"]))
            if same is not None:
                _drop(prep, by_name[ex["source"]], ex, "contaminated", "sft_eval: the same instruction up to case, "
                      "punctuation and spacing", same)
                continue
            hit = index.find(conversation_text(ex["messages"]), ex["lang"])
            if hit is not None:
                _drop(prep, by_name[ex["source"]], ex, "contaminated", f"{hit.eval_source}: {hit.ngram[:80]}",
                      hit.eval_id)
                continue
        kept.append(ex)
    prep.examples = kept
