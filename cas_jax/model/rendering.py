"""The one rendering of "document, then conversation", used by every path.

ICL, RAG, self-study's agents and teacher, the student, cartridge initialisation, evaluation
and serving all lay out a sequence the same way:

    document(passages) + conversation(messages)

`document` is the document block: the tokens a cartridge stands in for. `conversation` is the
chat template applied to the user/assistant turns with NO system turn: a template that inserts
a default system turn when none is given (SmolLM2: "You are a helpful AI assistant named
SmolLM...") has it removed, because a fresh system turn between the document and the question
is where a small model stops reading its document (docs/log.md, "One rendering"). Closed
book is `conversation(messages)` alone; a cartridge made from the K/V of `document(...)` and
placed before `conversation(...)` computes exactly what ICL computes (tested on the real
model).

Formats of the document block (`FORMATS`):
  plain   the passages' text as raw tokens, then a newline; the conversation's first turn
          header follows directly. The document's first P tokens are then literally the
          first P tokens a cartridge is initialised from.
  system  the passages as the template's system turn (the self-study teacher's view before
          this module existed).
Passages are joined by a blank line; `titled` heads a passage with its document's title.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

from cas_jax.model import tokenizer as tok_lib

FORMATS = ("plain", "system")
DEFAULT_FORMAT = "plain"
_PLACEHOLDER = "-"


def titled(title: str, text: str) -> str:
    """A passage: `text`, headed by its document's `title` line unless it already starts with
    it (Factbook documents do; RAG chunks and self-study chunks after the first do not)."""
    return text if text.startswith(title) else f"{title}\n{text}"


@dataclasses.dataclass(frozen=True, eq=False)
class Rendering:
    """Renders document blocks and conversations for one tokenizer (see module doc)."""

    tokenizer: Any
    format: str = DEFAULT_FORMAT

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"rendering format {self.format!r}: expected one of {FORMATS}")

    # -- the two halves

    def document(self, passages: str | Sequence[str]) -> list[int]:
        """Token ids of the document block holding `passages` (a text, or texts best first)."""
        text = passages if isinstance(passages, str) else "\n\n".join(passages)
        if not text.strip():
            raise ValueError("a document block needs non-empty text")
        if self.format == "plain":
            return self._encode(text.rstrip("\n") + "\n")
        return self._template([{"role": "system", "content": text}], False)

    def conversation(self, messages: Sequence[dict[str, str]],
                     add_generation_prompt: bool = True) -> list[int]:
        """Token ids of user/assistant `messages` under the chat template, with no system turn;
        `add_generation_prompt` appends the assistant header."""
        if any(m["role"] == "system" for m in messages):
            raise ValueError("conversation(): system turns are not part of a conversation; "
                             "the document block takes their place")
        head = self._system_head
        if head is None:
            return self._template(list(messages), add_generation_prompt)
        full = self._template([{"role": "system", "content": _PLACEHOLDER}, *messages],
                              add_generation_prompt)
        if full[:len(head)] != head:
            raise ValueError("the chat template does not render a system turn as a prefix of "
                             "the conversation; cannot remove it")
        return full[len(head):]

    def prompt(self, passages: str | Sequence[str] | None, messages: Sequence[dict[str, str]],
               add_generation_prompt: bool = True) -> list[int]:
        """document(passages) + conversation(messages); closed book when passages is None."""
        doc = [] if passages is None else self.document(passages)
        return doc + self.conversation(messages, add_generation_prompt)

    def assistant_spans(self, messages: Sequence[dict[str, str]]) -> list[tuple[int, int]]:
        """[start, end) token spans of each assistant turn (its content and end-of-turn
        tokens, without the header) inside `conversation(messages, False)`."""
        full = self.conversation(messages, add_generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.conversation(messages[:i], add_generation_prompt=True)
            upto = self.conversation(messages[:i + 1], add_generation_prompt=False)
            if full[:len(before)] != before or full[:len(upto)] != upto:
                raise ValueError("the chat template does not render a conversation as the "
                                 "concatenation of its turns")
            spans.append((len(before), len(upto)))
        return spans

    # -- helpers

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _template(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        return tok_lib.encode_chat(self.tokenizer, messages, add_generation_prompt)

    @functools.cached_property
    def _system_head(self) -> list[int] | None:
        """The tokens of a placeholder system turn, which `conversation` strips; None when the
        template has no system role. Rendered once per Rendering, not per conversation."""
        try:
            return self._template([{"role": "system", "content": _PLACEHOLDER}], False)
        except Exception:  # templates without a system role raise (jinja exceptions vary)
            return None


def rendering_for(tokenizer, format: str = DEFAULT_FORMAT) -> Rendering:
    """The rendering of `tokenizer` in `format` (kept on the tokenizer object, one per format)."""
    cache = tokenizer.__dict__.setdefault("_cas_jax_renderings", {})
    if format not in cache:
        cache[format] = Rendering(tokenizer, format)
    return cache[format]
