"""Text out of the serving engine, token by token: incremental detokenisation, stop strings
and the per-token facts OpenAI's `logprobs` report.

`Detokenizer` releases the text of a growing token sequence as it becomes final: a token that
ends inside a multi-byte UTF-8 character releases nothing until the character completes, so
no chunk ever carries half a character (or U+FFFD for one). The released pieces concatenate to
`tokenizer.decode(ids, skip_special_tokens=True)`.

`StopText` holds back the end of the text while it could still be the start of a stop string,
so a stop string split across tokens (or chunks) is found, and the text before it is all that
is ever released.
"""

from __future__ import annotations

import dataclasses
import functools


class Detokenizer:
    """Incremental detokenisation of one row (module doc). Special tokens release no text.

    Decodes a short window of the latest tokens (from `_prefix` on) and releases what it adds
    past the text of the window's first part: the window keeps tokenizers whose decoding of a
    token depends on its neighbours (SentencePiece's leading spaces) exact.
    """

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._skip = frozenset(tokenizer.all_special_ids)
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens whose text was released

    def push(self, token: int) -> str:
        """The text that `token` makes final ("" while a character is incomplete)."""
        if token in self._skip:
            return ""
        self._ids.append(token)
        before = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix, len(self._ids))
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(before):]

    def flush(self) -> str:
        """The text still held (an incomplete character at the end decodes as U+FFFD)."""
        before = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix, len(self._ids))
        self._prefix = self._read = len(self._ids)
        return text[len(before):]

    def _decode(self, start: int, end: int) -> str:
        return self._tok.decode(self._ids[start:end], skip_special_tokens=True)


class StopText:
    """Finds stop strings in text pushed piece by piece (module doc)."""

    def __init__(self, stops: tuple[str, ...]):
        self._stops = stops
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text now safe to release, whether a stop string ended the text). After a stop, the
        released text is everything before the first stop string."""
        buf = self._held + text
        cuts = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if cuts:
            self._held = ""
            return buf[:min(cuts)], True
        keep = 0
        for k in range(min(len(buf), max((len(s) for s in self._stops), default=1) - 1), 0, -1):
            if any(s.startswith(buf[-k:]) for s in self._stops):
                keep = k
                break
        self._held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """The held text (no stop string followed)."""
        held, self._held = self._held, ""
        return held


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One token of OpenAI's `logprobs.content`: its text, log-probability and UTF-8 bytes,
    with the `top` alternatives as (token id, log-probability) pairs."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_BYTE_OF = {c: b for b, c in _bytes_to_unicode().items()}


@functools.lru_cache(maxsize=8)
def _byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"


def token_bytes(tokenizer, token: int) -> bytes:
    """The UTF-8 bytes a token stands for (for a byte-level BPE, exactly its bytes, which may
    be part of a character; otherwise its decoded text's bytes)."""
    if _byte_level(tokenizer) and token not in tokenizer.all_special_ids:
        piece = tokenizer.convert_ids_to_tokens(token)
        if all(c in _BYTE_OF for c in piece):
            return bytes(_BYTE_OF[c] for c in piece)
    return tokenizer.decode([token]).encode("utf-8", "replace")


def logprobs_content(tokenizer, entries: list[TokenLogprob]) -> list[dict]:
    """OpenAI's `logprobs.content` list for `entries`."""

    def one(token: int, logprob: float) -> dict:
        raw = token_bytes(tokenizer, token)
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob,
                "bytes": list(raw)}

    return [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
            for e in entries]
