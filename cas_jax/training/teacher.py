"""Self-study's teacher: what it reads, and the top-k targets it gives the student.

Two views of each conversation (`views`):
  teacher: document(chunk) + conversation   (what agent B saw)
  student: conversation alone, exactly what evaluation gives a cartridge to read (the
    cartridge stands where the document block stood).
Alignment of a stored example (see `dataset.Conversation`): `loss_mask[t]` is True iff student
token t+1 belongs to an assistant turn (its content and end-of-turn token), and the teacher rows
hold the top-k of the teacher's next-token log-softmax at that position, i.e. its prediction of
student token t+1 from chunk + tokens[:t+1]. Rows are computed in batches by one jitted forward
over right-padded, bucketed lengths (`teacher_targets`).

The document blocks of a batch are prefilled once (`prefill_blocks` -> `SystemContext`) and
their K/V are the prefix of both agents' prompts and of the teacher's forward, so a chunk is
read once, not three times.

The teacher runs the model only through the model contract (`cas_jax.model.decoder.Decoder`):
a `LoadedModel` whose config is a researcher's own decoder teaches as cas_jax's own does.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cas_jax.model import llama as model_lib, rendering, sampling
from cas_jax.model.config import ModelConfig
from cas_jax.model.decoder import Decoder
from cas_jax.model.loading import LoadedModel


@functools.partial(jax.jit, static_argnames=("config", "k", "chunk"))
def teacher_topk(params, tokens: jax.Array, positions: jax.Array, targets: jax.Array,
                 prefix=None, *, config: ModelConfig | Decoder, k: int, chunk: int):
    """Top-k next-token log-probabilities at chosen positions (of any `Decoder`).

    tokens, positions [B, T] (position -1 = padding); targets [B, M] int32 token indices whose
    next-token distribution is kept (M a multiple of `chunk`); prefix: optional K/V before the
    tokens (`Decoder.forward`). Log-softmax in float32.
    Returns ids [B, M, k] int32 and logprobs [B, M, k] float32, best first.
    """
    decoder = model_lib.as_decoder(config)
    hidden, _ = decoder.forward(params, tokens, positions, None, prefix)
    h_bmd = jnp.take_along_axis(hidden, targets[:, :, None], axis=1)
    b, m, d = h_bmd.shape
    h_cbnd = h_bmd.reshape(b, m // chunk, chunk, d).swapaxes(0, 1)

    def one(h_bnd):
        logits = decoder.logits(params, h_bnd).astype(jnp.float32)
        logprobs, ids = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), k)
        return ids.astype(jnp.int32), logprobs

    ids, logprobs = jax.lax.map(one, h_cbnd)
    return (ids.swapaxes(0, 1).reshape(b, m, k), logprobs.swapaxes(0, 1).reshape(b, m, k))


@dataclasses.dataclass(frozen=True)
class SystemContext:
    """The prefilled document blocks of a batch: ids, each row's document-block tokens; k, v
    [L, U, S, K, Dh] the K/V of the U distinct blocks (positions 0..n-1, padding after);
    block [N] int, each row's block in k and v (rows of one document share one)."""

    ids: tuple[tuple[int, ...], ...]
    k: jax.Array
    v: jax.Array
    block: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        """[N] int32 document-block tokens per row."""
        return np.asarray([len(x) for x in self.ids], np.int32)

    def strip(self, row: int, tokens: Sequence[int]) -> Sequence[int]:
        """Row `row`'s tokens after its document block (which they must start with)."""
        n = len(self.ids[row])
        if tuple(tokens[:n]) != self.ids[row]:
            raise ValueError(f"self-study row {row}: the input does not start with its "
                             "document block")
        return tokens[n:]

    def select(self, rows: Sequence[int]) -> "SystemContext":
        """The context of `rows` only, in that order (no K/V copied)."""
        return SystemContext(tuple(self.ids[i] for i in rows), self.k, self.v,
                             self.block[np.asarray(rows, int)])

    def prefix(self, start: int, stop: int, rows: int | None = None) -> dict:
        """Rows [start, stop) as a `Decoder.forward` prefix, padded to `rows` rows by repeating
        the last (padding rows' outputs are discarded)."""
        idx = np.arange(start, stop)
        idx = np.concatenate([idx, np.full((rows or len(idx)) - len(idx), idx[-1])])
        mask = np.arange(self.k.shape[2])[None] < self.lengths[idx][:, None]
        blocks = jnp.asarray(self.block[idx])
        return {"k": self.k[:, blocks], "v": self.v[:, blocks], "mask": jnp.asarray(mask)}


def prefill_blocks(model: LoadedModel, blocks: Sequence[Sequence[int]]) -> SystemContext:
    """Prefills each row's document block (one row each; a block shared by several rows, e.g.
    a whole short document, is prefilled once)."""
    ids = [tuple(b) for b in blocks]
    unique = list(dict.fromkeys(ids))
    # Multiples of 512: each distinct prefix length compiles the prefill, the agents'
    # sampler and the teacher again (minutes on a 2-core CPU).
    length = -(-max(map(len, unique)) // 512) * 512
    tokens, positions = sampling.right_pad(unique, length,
                                           sampling.bucket(len(unique), minimum=1))
    k, v = model_lib.prefill_kv_jit(model.params, jnp.asarray(tokens), jnp.asarray(positions),
                                    config=model.config)
    return SystemContext(tuple(ids), k, v, np.asarray([unique.index(x) for x in ids]))


def views(render: rendering.Rendering, block: Sequence[int],
          conversation: Sequence[dict[str, str]], stop_ids: Sequence[int]):
    """A conversation behind its document block -> (teacher tokens [Tt], teacher target
    indices [M], student tokens [T], loss_mask [T]) (module doc)."""
    student = render.conversation(conversation, add_generation_prompt=False)
    teacher = list(block) + student
    mask = np.zeros(len(student), bool)
    for start, end in render.assistant_spans(conversation):
        if start == 0:
            raise ValueError("an assistant turn starts the conversation; nothing predicts it")
        stops = [j for j in range(start, end) if student[j] in stop_ids]
        end = stops[0] + 1 if stops else end
        mask[start - 1:end - 1] = True
    return (np.asarray(teacher, np.int32), np.flatnonzero(mask) + len(block),
            np.asarray(student, np.int32), mask)


def teacher_targets(model: LoadedModel, rows: list[tuple[np.ndarray, np.ndarray]],
                    context: SystemContext | None = None, *, topk: int, batch_size: int
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row (teacher tokens, target indices [M]) -> (ids [M, topk], logprobs [M, topk]),
    `batch_size` rows per forward.

    context: the K/V of each row's first `context.lengths[i]` teacher tokens (its document
    block, already prefilled for the agents); only the tokens after them are run."""
    out = []
    n = batch_size
    if context is not None:
        rows = [(context.strip(i, tk), tg - len(context.ids[i]))
                for i, (tk, tg) in enumerate(rows)]
    skip = np.zeros(len(rows), np.int32) if context is None else context.lengths
    for i in range(0, len(rows), n):
        group = rows[i:i + n]
        b = sampling.bucket(len(group), minimum=1)
        m = sampling.bucket(max(len(tg) for _, tg in group))
        tokens, positions = sampling.right_pad(
            [tk for tk, _ in group], sampling.bucket(max(len(tk) for tk, _ in group)), b,
            starts=skip[i:i + n])
        targets = np.zeros((b, m), np.int32)
        for j, (_, tg) in enumerate(group):
            targets[j, :len(tg)] = tg
        prefix = None if context is None else context.prefix(i, i + len(group), rows=b)
        ids, logprobs = teacher_topk(model.params, jnp.asarray(tokens), jnp.asarray(positions),
                                     jnp.asarray(targets), prefix, config=model.config, k=topk,
                                     chunk=min(m, 128))
        ids, logprobs = np.asarray(ids), np.asarray(logprobs)
        out.extend((ids[j, :len(tg)], logprobs[j, :len(tg)])
                   for j, (_, tg) in enumerate(group))
    return out
