"""A question's prompt and how its answer is read, the same for every evaluation method.

Every method asks the same query tokens (`build_prompt`); methods differ only in what comes
before the query (`cas_jax.evaluation.evaluate`). ICL and RAG put their passages in
`cas_jax.model.rendering`'s document block, cut to a token budget by `fit_context`. A
generated answer is read by `parse_choice` (multiple choice) or `answer_matches` (free answer).
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Sequence

from cas_jax.evaluation.questions import Question
from cas_jax.model import rendering

LETTERS = string.ascii_uppercase
MC_INSTRUCTION = "Answer with the correct option."


@dataclasses.dataclass(frozen=True)
class Prompt:
    """Token ids of one question's prompt: `context` (the document block, [] without context),
    then `query` (the question turn, ending with the assistant header); see
    `cas_jax.model.rendering`."""

    context: list[int]
    query: list[int]


def question_text(question: Question, list_options: bool = False) -> str:
    """The user message: the question; for multiple choice with `list_options`, then "A. ...",
    "B. ..." lines and `MC_INSTRUCTION`."""
    if question.options is None or not list_options:
        return question.question
    if len(question.options) > len(LETTERS):
        raise ValueError(f"{len(question.options)} options exceed the {len(LETTERS)} letters")
    lines = [f"{LETTERS[i]}. {o}" for i, o in enumerate(question.options)]
    return f"{question.question}\n\n" + "\n".join(lines) + f"\n\n{MC_INSTRUCTION}"


def build_prompt(tokenizer, question: Question, passages: Sequence[tuple[str, str]] | None = None,
                 list_options: bool = False, format: str = rendering.DEFAULT_FORMAT) -> Prompt:
    """The prompt of every method: `cas_jax.model.rendering`'s document block for the (title, text)
    `passages` (None: closed book), then the question turn. The query is identical whatever
    the context, and is exactly the student's view in training, so a cartridge made from the
    context's K/V sees the same sequence as ICL."""
    r = rendering.rendering_for(tokenizer, format)
    query = r.conversation([{"role": "user", "content": question_text(question, list_options)}])
    if passages is None:
        return Prompt([], query)
    return Prompt(r.document([rendering.titled(t, x) for t, x in passages]), query)


def fit_context(tokenizer, passages: Sequence[tuple[str, str]], budget: int,
                format: str = rendering.DEFAULT_FORMAT) -> tuple[list[int], int]:
    """The document block for (title, text) `passages` in at most `budget` tokens:
    (tokens, text tokens dropped).

    Trailing passages are dropped first, then the last kept one is cut at a token boundary.
    """
    r = rendering.rendering_for(tokenizer, format)
    block_of = lambda ps: r.document([rendering.titled(t, x) for t, x in ps])  # noqa: E731
    passages = list(passages)
    block = block_of(passages)
    dropped = 0
    while len(block) > budget and len(passages) > 1:
        dropped += len(tokenizer.encode(passages.pop()[1], add_special_tokens=False))
        block = block_of(passages)
    if len(block) <= budget:
        return block, dropped
    title, text = passages[-1]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    keep = len(offsets) - (len(block) - budget)
    while True:
        if keep < 1:
            raise ValueError(f"a context budget of {budget} tokens has no room for any text")
        block = block_of(passages[:-1] + [(title, text[:offsets[keep - 1][1]])])
        if len(block) <= budget:
            return block, dropped + len(offsets) - keep
        keep -= len(block) - budget


# ----------------------------------------------------------------------------- answers


def _normalise(text: str) -> str:
    return " " + " ".join(re.sub(r"[^0-9a-z]+", " ", text.casefold()).split()) + " "


def parse_choice(text: str, options: Sequence[str]) -> int | None:
    """The option a generated answer picks, or None.

    In order: a leading letter followed by punctuation or the end ("B", "(B)", "B. Paris");
    else the longest option whose normalised text appears in the answer; else "answer is B".
    """
    letters = LETTERS[:len(options)]
    m = re.match(r"\s*\(?([A-Z])\s*(?:[.):]|$)", text)
    if m and m.group(1) in letters:
        return letters.index(m.group(1))
    norm = _normalise(text)
    found = [i for i, o in enumerate(options) if _normalise(o).strip() and _normalise(o) in norm]
    if found:
        return max(found, key=lambda i: len(_normalise(options[i])))
    m = re.search(r"answer is:?\s*\(?([A-Z])\b", text)
    if m and m.group(1) in letters:
        return letters.index(m.group(1))
    return None


def answer_matches(text: str, gold: str) -> bool:
    """True iff the normalised gold text (casefolded, punctuation as spaces) is in `text`."""
    return _normalise(gold) in _normalise(text)
