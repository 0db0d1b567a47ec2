"""Span conversations: self-study turns built from the chunk's own text, with no generation.

A small model asked about its document mostly answers without reading it (docs/log.md,
"Self-study that stays grounded"). A span conversation sidesteps that: every assistant turn
is a verbatim segment of the chunk, and every user turn is a cue drawn from that segment, so
the teacher (who reads the chunk) predicts the answer by copying it while the no-context
student cannot; the distillation target is the teacher's distribution over those tokens.

Segments are the chunk's lines, a long line cut at sentence ends, else at commas or spaces, to
at most `max_segment_chars` characters (so a conversation stays within a training sequence); lines
shorter than `min_words` words are skipped, and so is the chunk's first line when it is the
document's title. The cue depends only on the text's shape, not on any one collection:
  "key: value" segments (a colon within the first `max_key_chars` characters) ask about the key:
      What does the document say about "Government > Capital > name"?
  other segments quote their first `cue_words` words:
      How does the document continue after "The river rises in the"?
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+(?=[A-Z0-9\"'(])")
_CLAUSE_END = re.compile(r"(?<=[,;])\s+")
_SPACE = re.compile(r"\s+")


def segments(text: str, *, title: str | None = None, min_words: int = 3,
             max_segment_chars: int = 240) -> list[str]:
    """The chunk's answerable segments, in order (see module doc)."""
    out = []
    lines = [ln.strip() for ln in text.splitlines()]
    if title is not None and lines and lines[0] == title.strip():
        lines = lines[1:]
    for line in lines:
        for piece in _split_long(line, max_segment_chars):
            if len(piece.split()) >= min_words:
                out.append(piece)
    return out


def _split_long(line: str, max_chars: int, boundaries: tuple = ()) -> list[str]:
    """`line` cut into pieces of at most `max_chars`: at sentence ends, a piece still too long
    after commas and semicolons, then at spaces (a single longer word stays whole)."""
    boundaries = boundaries or (_SENTENCE_END, _CLAUSE_END, _SPACE)
    if len(line) <= max_chars:
        return [line] if line else []
    pieces, current = [], ""
    for part in boundaries[0].split(line):
        if current and len(current) + 1 + len(part) > max_chars:
            pieces.append(current)
            current = part
        else:
            current = f"{current} {part}".strip()
    if current:
        pieces.append(current)
    if len(boundaries) == 1:
        return pieces
    return [q for p in pieces for q in _split_long(p, max_chars, boundaries[1:])]


def cue(segment: str, *, max_key_chars: int = 100, cue_words: int = 6) -> str:
    """The user turn asking for `segment` (see module doc)."""
    key, sep, value = segment.partition(":")
    if sep and value.strip() and len(key) <= max_key_chars:
        return f"What does the document say about \"{key.strip()}\"?"
    words = segment.split()
    return f"How does the document continue after \"{' '.join(words[:cue_words])}\"?"


def conversation(text: str, rng: np.random.Generator, turns: int, *, title: str | None = None
                 ) -> list[dict[str, str]]:
    """Up to `turns` (cue, segment) exchanges on distinct segments of `text`, in document order
    from a random start; [] when the text has no segment."""
    segs = segments(text, title=title)
    if not segs:
        return []
    n = min(turns, len(segs))
    picks = np.sort(rng.choice(len(segs), size=n, replace=False))
    conv: list[dict[str, str]] = []
    for i in picks:
        conv += [{"role": "user", "content": cue(segs[i])},
                 {"role": "assistant", "content": segs[i]}]
    return conv


def answers(messages: Sequence[dict[str, str]]) -> list[str]:
    """The assistant turns' texts."""
    return [m["content"] for m in messages if m["role"] == "assistant"]
