"""The chat template, and the one function that turns a conversation into training ids and loss labels.

Which template: the model's own ``chat_template`` when its tokenizer has one (``sft.chat_template: auto``), else
cpt's default below. The default is the Mistral / Llama-2 ``[INST]`` format (Vistral-7B-Chat, the recipe cpt
follows, uses it) built only on the tokenizer's own BOS and EOS: no new turn-marker tokens, so no new embedding rows
to initialise and nothing that changes how plain text tokenizes::

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant}</s>[INST] {user} [/INST] {assistant}</s>

``[INST]`` / ``[/INST]`` are plain text (a few ordinary tokens). The assistant turn is wrapped in
``{% generation %}`` so that transformers' ``return_assistant_tokens_mask`` (and TRL's ``assistant_only_loss``) see
the same assistant tokens cpt trains on.

The training format IS the template: ``encode`` renders the conversation with ``tokenizer.apply_chat_template`` and
tokenizes the rendered text exactly as ``apply_chat_template(..., tokenize=True)`` does (no special tokens added:
the template writes BOS itself), so the exported tokenizer reproduces the training ids by construction (tested).
The loss labels come from the rendered text, not from the template's internals, so any template works: the
assistant span of turn ``i`` is the text between ``render(messages[:i], add_generation_prompt=True)`` and
``render(messages[:i+1])``; a token is trained on iff its characters overlap an assistant span (the reply, and the
EOS that ends it: the model must learn to stop). A template that is not prefix-stable (the rendering of a prefix
of the conversation is not a prefix of the whole rendering) cannot be masked this way and is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cpt.errors import ConfigError, DataError
from cpt.training.loss import IGNORE_INDEX as IGNORE  # label of a token the loss skips (prompt side, padding)

DEFAULT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}"
    "{%- if not loop.first %}{{ raise_exception('a system message must come first') }}{%- endif %}"
    "{%- elif message['role'] == 'user' %}"
    "{{- '[INST] ' }}"
    "{%- if loop.index0 == 1 and messages[0]['role'] == 'system' %}"
    "{{- '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' }}"
    "{%- endif %}"
    "{{- message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- generation %}{{- ' ' + message['content'] + eos_token }}{%- endgeneration %}"
    "{%- else %}{{ raise_exception('unknown role ' + message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
)
# Text that must not occur inside a message: it would read as a turn boundary (or a special token) once rendered.
DEFAULT_MARKERS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")


def template_of(folder: Path) -> str | None:
    """The chat template an HF folder ships (``chat_template.jinja`` or tokenizer_config.json's string), if any."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        value = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(value, str) and value.strip():
            return value
    return None


def choose_template(tokenizer, setting: str, base_dir: Path | None = None) -> tuple[str, str]:
    """(template, origin): ``auto`` = the model's own (its tokenizer's, else the base model's: the tokenizer stage
    may not carry it over), else cpt's default; ``default``; or a .jinja path."""
    if setting == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, str) and own.strip():
            return own, "model"
        base = template_of(base_dir) if base_dir is not None else None
        if base:
            return base, "base"
        return DEFAULT_TEMPLATE, "default"
    if setting == "default":
        return DEFAULT_TEMPLATE, "default"
    path = Path(setting)
    if not path.is_file():
        raise ConfigError(f"sft.chat_template={setting!r}: expected auto, default or a .jinja file (not found)")
    return path.read_text(encoding="utf-8"), str(path)


def check_tokenizer(tokenizer, where: Path) -> None:
    if tokenizer.eos_token is None:
        raise ConfigError(f"{where}: the tokenizer has no EOS token; a chat model needs one to end its turns")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{where}: a fast tokenizer (tokenizer.json) is needed for the assistant-token mask")


def forbidden_strings(tokenizer, template: str) -> tuple[str, ...]:
    """Strings a message may not contain: the tokenizer's special tokens, and the default template's markers."""
    specials = tuple(t for t in tokenizer.all_special_tokens if t)
    return specials + (DEFAULT_MARKERS if template == DEFAULT_TEMPLATE else ())


def render(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (see the module docstring)."""
    text = render(tokenizer, messages)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ConfigError("the chat template is not prefix-stable (rendering part of a conversation is not a "
                              "prefix of rendering all of it): assistant tokens cannot be found; use "
                              "sft.chat_template: default")
        spans.append((len(before), len(upto)))
    return text, spans


@dataclass
class Encoded:
    ids: list[int]
    labels: list[int]  # = ids on assistant tokens, IGNORE elsewhere (not yet shifted)
    assistant_bytes: int  # UTF-8 bytes of the assistant spans: the denominator of assistant bits per byte


def encode(tokenizer, conversations: list[list[dict]]) -> list[Encoded]:
    """Training ids and labels for each conversation (one batched tokenizer call)."""
    rendered = [assistant_spans(tokenizer, conv) for conv in conversations]
    if not rendered:
        return []
    enc = tokenizer([t for t, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    specials = [t for t in tokenizer.all_special_tokens if t]
    out = []
    for (text, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
        labels = [IGNORE] * len(ids)
        for j, (a, b) in enumerate(offsets):
            if b > a and any(a < e and b > s for s, e in spans):
                labels[j] = ids[j]
        if all(label == IGNORE for label in labels):
            raise DataError(f"conversation {text[:60]!r}: no assistant token after tokenization")
        out.append(Encoded(list(ids), labels, sum(_text_bytes(text[s:e], specials) for s, e in spans)))
    return out


def _text_bytes(span: str, specials: list[str]) -> int:
    """Bytes of text behind a span: special-token strings (the EOS) stand for no text."""
    for tok in specials:
        span = span.replace(tok, "")
    return len(span.encode("utf-8"))
