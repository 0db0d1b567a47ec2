"""A chat request's messages as prompt tokens: roles, bounds and special-token escaping.

Layout is the project's one rendering (`cas_jax.model.rendering`): the document block, then the
conversation without a system turn. A leading `system` or `developer` message (OpenAI's newer
name for the same instructions) is the document block, which is exactly in-context learning of
its text; a system or developer message anywhere else is refused. `tool` messages are refused:
this server offers no tools, so no tool call exists for them to answer. An assistant message
with null content renders as an empty turn.

Tokenisation is bounded: text longer than `_EXACT_CHARS` is first counted in pieces, and a
request that already exceeds the window is refused before the whole text is tokenised (a
tokenizer call holds Python's GIL, so an unbounded one stalls every thread of the server).

Special tokens: by default, text that spells a special token (`<|im_end|>`) becomes that
control token, as in transformers and vLLM. With `escape=True`, message contents are
tokenised as plain text (`split_special_tokens`), so a user cannot close their own turn; the
template's own control tokens are unchanged.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from cas_jax.model import rendering as rendering_lib
from cas_jax.serving.engine import ServeError

_EXACT_CHARS = 16384  # texts up to this long are tokenised at once
_PIECE_CHARS = 4096  # pieces of a longer text are about this long, cut at whitespace
_PIECE_SLACK = 4  # tokens a cut may add to a piece's count


def split_messages(messages: Sequence[dict]) -> tuple[str | None, list[dict[str, str]]]:
    """(document text or None, conversation turns) of OpenAI messages {role, content (str or
    None)}; ServeError 400 for a layout this server cannot render (module doc)."""
    doc = None
    if messages and messages[0]["role"] in ("system", "developer"):
        if messages[0]["content"] is None:
            raise ServeError(400, f"messages[0]: a {messages[0]['role']} message needs content",
                             param="messages")
        doc, messages = messages[0]["content"], messages[1:]
    turns = []
    for i, m in enumerate(messages, start=0 if doc is None else 1):
        role = m["role"]
        if role in ("system", "developer"):
            raise ServeError(400, f"messages[{i}]: only the first message may be a system or "
                             f"developer message; its text is rendered as the document block "
                             f"(cartridges take the same place)", param="messages")
        if role == "tool":
            raise ServeError(400, f"messages[{i}]: role 'tool' answers a tool call, and this "
                             f"server offers no tools", param="messages")
        if m["content"] is None and role != "assistant":
            raise ServeError(400, f"messages[{i}]: a {role} message needs content",
                             param="messages")
        turns.append({"role": role, "content": m["content"] or ""})
    if not turns:
        raise ServeError(400, "messages need a user or assistant turn", param="messages")
    return doc, turns


def last_user_text(messages: Sequence[dict]) -> str:
    """The text of the last user message ("" if none): the question a routing geometry
    scores a request's cartridges against, as evaluation scores them against the question."""
    return next((m["content"] or "" for m in reversed(messages) if m["role"] == "user"), "")


class PromptMaker:
    """Prompt token ids of chat messages for one tokenizer and context window (module doc)."""

    def __init__(self, tokenizer, window: int):
        self.tokenizer, self.window = tokenizer, window
        self.rendering = rendering_lib.rendering_for(tokenizer)
        self._specials = tuple(tokenizer.all_special_tokens)

    def __call__(self, messages: Sequence[dict], escape: bool = False) -> list[int]:
        doc, turns = split_messages(messages)
        texts = ([doc] if doc is not None else []) + [t["content"] for t in turns]
        self._check_bounded(texts)
        try:
            if escape and any(s in t for t in texts for s in self._specials):
                return self._escaped(doc, turns)
            return self.rendering.prompt(doc, turns)
        except ValueError as e:
            raise ServeError(400, str(e), param="messages") from None

    def _check_bounded(self, texts: list[str]) -> None:
        """Refuses text that holds more tokens than the window, counting long texts in pieces
        and stopping as soon as the count is over."""
        if sum(len(t) for t in texts) <= _EXACT_CHARS:
            return
        limit, count = self.window, 0
        for text in texts:
            start = 0
            while start < len(text):
                end = min(len(text), start + _PIECE_CHARS)
                if end < len(text):
                    cut = text.rfind(" ", start + _PIECE_CHARS // 2, end)
                    end = cut if cut > start else end
                piece = text[start:end]
                count += len(self.tokenizer(piece, add_special_tokens=False)["input_ids"])
                count -= _PIECE_SLACK
                if count > limit:
                    raise ServeError(400, f"the messages hold more than {limit} tokens, the "
                                     f"context window", param="messages",
                                     code="context_length_exceeded")
                start = end

    # -- escaping

    def _escaped(self, doc: str | None, turns: list[dict[str, str]]) -> list[int]:
        ids = []
        if doc is not None:
            if self.rendering.format == "plain":
                ids = self._plain(doc.rstrip("\n") + "\n")
            else:
                ids = self._segmented([{"role": "system", "content": doc}], False, None)
        return ids + self._segmented(turns, True, "-")

    def _plain(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False,
                                   split_special_tokens=True)["input_ids"])

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _segmented(self, messages: list[dict[str, str]], add_generation_prompt: bool,
                   head: str | None) -> list[int]:
        """The template's tokens with every message content tokenised as plain text: the
        template is rendered with a marker in place of each content and cut at the markers.
        With `head`, a placeholder system turn leads (and is removed), as
        `rendering.conversation` does to drop the template's default system turn."""
        tag = uuid.uuid4().hex
        marked = [{"role": m["role"], "content": f"\x00{tag}{i}\x00"}
                  for i, m in enumerate(messages)]
        lead = [] if head is None else [{"role": "system", "content": head}]
        try:
            text = self.tokenizer.apply_chat_template(
                lead + marked, tokenize=False, add_generation_prompt=add_generation_prompt)
            lead_ids = self._encode(self.tokenizer.apply_chat_template(
                lead, tokenize=False)) if lead else []
        except Exception as e:  # jinja's errors vary
            if lead:  # a template without a system role: no default turn to drop
                return self._segmented(messages, add_generation_prompt, None)
            raise ValueError(f"the chat template cannot render these messages: {e}") from None
        ids = []
        for i, m in enumerate(messages):
            before, mark, text = text.partition(marked[i]["content"])
            if not mark:
                raise ValueError("the chat template does not render message contents "
                                 "verbatim; cannot escape special tokens")
            ids += self._encode(before) + self._plain(m["content"])
        ids += self._encode(text)
        if ids[:len(lead_ids)] != lead_ids:
            raise ValueError("the chat template does not render a system turn as a prefix of "
                             "the conversation; cannot remove it")
        return ids[len(lead_ids):]
