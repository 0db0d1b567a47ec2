"""Training under a routing geometry: each composed row's cartridge biases, as a reader's.

A reader routes a composed set by its documents' retrieval scores for the question
(`attention` module doc, `retrieval.Router`). A training row has no question, so it is routed
by its conversation's first exchange: the first user turn and the answer to it. The first
turn alone would not do: a self-study span turn names a field ("Geography > Area > water"),
which every section of that type shares, while a question at read time names its document
("... of Suriname"); the answer's values name the document as well. Measured on dev26
(BM25, sets of 4 documents): the row's own document is the best of its set for 85% of rows
by the first exchange (27% by the first turn alone) and for 95% of the questions at read
time.

The scores of every row against all N documents of the run are computed in the data
pipeline (`dataset.make_train_iterator(route=)`, a row's `route_scores`); the step's plan
then turns them into its rows' `cartridge_bias` [B, C] (`retrieval.relevance_biases` of the
composed set's scores), which the trainer passes to `attention.compose` as every reader does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np

from cas_jax.cartridges.attention import Geometry
from cas_jax.documents import retrieval
from cas_jax.training.dataset import Conversation


def first_exchange(messages: str) -> str:
    """The first user turn and the assistant's answer to it, of a conversation's messages
    JSON ([{"role", "content"}, ...]); ValueError when it has no user turn."""
    turns = json.loads(messages)
    for i, turn in enumerate(turns):
        if turn.get("role") == "user":
            answer = next((t["content"] for t in turns[i + 1:]
                           if t.get("role") == "assistant"), "")
            return f"{turn['content']}\n{answer}".strip()
    raise ValueError("a self-study conversation without a user turn cannot be routed")


class RowRouter:
    """Routes training rows by `router` over the run's cartridge ids (`router.ids`, in
    order), under `geometry`'s relevance and floor."""

    def __init__(self, geometry: Geometry, router: retrieval.Router):
        self.geometry, self.router = geometry, router
        self._at = {d: i for i, d in enumerate(router.ids)}

    def scores(self, conv: Conversation) -> np.ndarray:
        """float32 [N]: the row's retrieval scores against every document."""
        try:
            query = first_exchange(conv.messages)
        except ValueError as e:
            raise ValueError(f"conversation {conv.conversation_index} of document "
                             f"{conv.doc_id!r}: {e}") from None
        return self.router.score_all(query).astype(np.float32)

    def biases(self, route_scores: np.ndarray, slot_ids: Sequence[str], selection: np.ndarray,
               selected: np.ndarray) -> np.ndarray:
        """float32 [B, C]: each row's composed cartridges' routing biases. route_scores [B, N];
        slot_ids: the document of each step-bank slot; selection/selected [B, C]."""
        out = np.zeros(selection.shape, np.float32)
        g = self.geometry
        for row in range(selection.shape[0]):
            cols = np.flatnonzero(selected[row])
            if len(cols) < 2:
                continue
            at = [self._at[slot_ids[s]] for s in selection[row, cols]]
            out[row, cols] = retrieval.relevance_biases(route_scores[row, at], g.relevance,
                                                        g.relevance_floor)
        return out


def row_router(geometry: Geometry, ids: Sequence[str], composes: bool, kind: str,
               texts: Mapping[str, str] | None) -> RowRouter | None:
    """The run's `RowRouter` over the cartridge ids `ids`, or None when no row needs one:
    `geometry` does not route, or no row reads more than one cartridge (composes False: no
    distractors, no quiet steps; `train.batch_prefix` gives a row of one cartridge bias 0).
    Otherwise `texts` (cartridge id -> document) are indexed by a `kind` retriever ("bm25" or
    "dense"); ValueError names the ids without one."""
    if geometry.relevance <= 0 or not composes:
        return None
    missing = [d for d in ids if texts is None or d not in texts]
    if missing:
        raise ValueError(f"training under the routing geometry {geometry} scores each "
                         f"cartridge's document; no text for {missing[:5]} (pass texts, or "
                         "a store that records its documents)")
    retriever = retrieval.make_retriever(kind, {d: texts[d] for d in ids})
    return RowRouter(geometry, retrieval.Router(retriever, ids, keep=1))
