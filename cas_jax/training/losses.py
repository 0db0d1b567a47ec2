"""Training losses for cartridges: context distillation, and next-token cross-entropy.

Alignment (the batch format of `train.py` and `dataset.py`): the prediction made at position t
targets token t+1. `loss_mask[b, t]` is True iff token t+1 is an assistant token (its content and
end-of-turn token); `teacher_ids/teacher_logprobs[b, t]` hold the teacher's top-k log-probabilities
for token t+1, best first, where the teacher is the frozen model with the document chunk in
context and the student is the same model reading the cartridge(s) instead of the chunk.

Distillation: the teacher keeps only its k best tokens, so its kept probabilities sum to less
than 1. They are renormalised over the kept tokens (a softmax of the k log-probabilities), giving
a proper distribution q over k tokens, and the per-token loss is the cross-entropy
    -sum_j q_j * log p_student(teacher_ids_j).
With `mass` (the reference uses 0.99) the teacher first keeps only its best tokens up to that
cumulative (un-renormalised) probability: token j stays iff the mass of the tokens before it is
below `mass`, so the best token always stays. The loss is minimal, and equals the entropy of q,
when the student puts exactly q on those tokens.

Everything is computed in float32 with log-softmax; means are over masked tokens only
(an all-False mask gives 0, not NaN).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

DISTILLATION = "distillation"
NEXT_TOKEN = "next_token"
LOSS_KINDS = (DISTILLATION, NEXT_TOKEN)


def teacher_probs(teacher_logprobs: jax.Array, mass: float | None = None) -> jax.Array:
    """[..., k] log-probabilities (best first) -> [..., k] float32 probabilities summing to 1.

    Renormalised over the kept tokens; with `mass`, tokens past the first ones reaching that
    cumulative teacher probability get probability 0 (see module doc).
    """
    lp = teacher_logprobs.astype(jnp.float32)
    if mass is not None:
        p = jnp.exp(lp)
        before = jnp.cumsum(p, axis=-1) - p
        lp = jnp.where(before < mass, lp, -jnp.inf)
    return jax.nn.softmax(lp, axis=-1)


def distillation_token_loss(logits: jax.Array, teacher_ids: jax.Array,
                            teacher_logprobs: jax.Array, mass: float | None = None) -> jax.Array:
    """Per-token cross-entropy against the teacher's top-k: logits [..., V] -> [...] float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    student = jnp.take_along_axis(logp, teacher_ids, axis=-1)
    q = teacher_probs(teacher_logprobs, mass)
    return -jnp.sum(jnp.where(q > 0, q * student, 0.0), axis=-1)


def next_token_token_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token cross-entropy of targets [...] int32 under logits [..., V] -> [...] float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def next_token_targets(tokens: jax.Array) -> jax.Array:
    """tokens [B, T] -> targets [B, T]: token t+1 at position t (0 at the last position)."""
    return jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of values [...] over mask [...] True entries; 0 when none is True."""
    total = jnp.sum(jnp.where(mask, values, 0.0))
    return total / jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)


def distillation_loss(logits: jax.Array, teacher_ids: jax.Array, teacher_logprobs: jax.Array,
                      loss_mask: jax.Array, mass: float | None = None) -> jax.Array:
    """Context-distillation loss (scalar), averaged over masked tokens.

    logits [B, T, V] (student, no document); teacher_ids [B, T, k] int32; teacher_logprobs
    [B, T, k]; loss_mask [B, T] bool.
    """
    return masked_mean(distillation_token_loss(logits, teacher_ids, teacher_logprobs, mass),
                       loss_mask)


def next_token_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Next-token cross-entropy (scalar) on the same tokens: position t predicts tokens[t+1].

    logits [B, T, V]; tokens [B, T] int32; loss_mask [B, T] bool (must be False at t = T-1).
    """
    return masked_mean(next_token_token_loss(logits, next_token_targets(tokens)), loss_mask)


def token_loss_fn(kind: str, mass: float | None = None
                  ) -> Callable[[jax.Array, dict[str, jax.Array]], jax.Array]:
    """(logits [..., V], per-token targets {..}) -> [...] losses, for `kind` in LOSS_KINDS.

    Targets: distillation {"teacher_ids", "teacher_logprobs"}; next_token {"next_ids"}.
    """
    if kind == DISTILLATION:
        return lambda logits, t: distillation_token_loss(
            logits, t["teacher_ids"], t["teacher_logprobs"], mass)
    if kind == NEXT_TOKEN:
        return lambda logits, t: next_token_token_loss(logits, t["next_ids"])
    raise ValueError(f"unknown loss {kind!r}, expected one of {LOSS_KINDS}")


def masked_loss_from_hidden(head: Callable[[jax.Array], jax.Array], hidden: jax.Array,
                            targets: dict[str, Any], loss_mask: jax.Array,
                            token_loss: Callable[[jax.Array, dict[str, jax.Array]], jax.Array],
                            chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """Sum and count of token losses over masked tokens, never holding [B, T, V] logits.

    head: hidden [..., D] -> logits [..., V]; hidden [B, T, D]; targets: per-token arrays
    [B, T, ...]; loss_mask [B, T]. When T fits in one chunk the logits are computed once,
    plainly. Otherwise each row's masked tokens are moved to its front (stable order) and the
    T axis is cut into the fewest chunks of at most `chunk_size` tokens, all of one length (so
    fewer than n padded positions, never a mostly-padded chunk); a chunk's logits are computed
    only if some row has a masked token in it (`lax.cond`), and are recomputed in the backward
    pass rather than stored (`jax.checkpoint`), so one chunk's logits are alive at a time.
    Returns (sum of losses, number of masked tokens), both float32 scalars.
    """
    b, t, _ = hidden.shape
    count = jnp.sum(loss_mask).astype(jnp.float32)
    n = -(-t // chunk_size)
    if n == 1:  # a one-step map and cond would only add copies and zero-filled buffers
        return jnp.sum(jnp.where(loss_mask, token_loss(head(hidden), targets), 0.0)), count
    order = jnp.argsort(~loss_mask, axis=1, stable=True)  # masked tokens first, per row
    gather = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)),
                                           axis=1)
    hidden, mask = gather(hidden), gather(loss_mask)
    targets = jax.tree.map(gather, targets)
    size = -(-t // n)
    pad = n * size - t

    def chunks(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((b, n, size) + x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_loss(args):
        h, m, tg = args
        return jax.lax.cond(jnp.any(m),
                            lambda: jnp.sum(jnp.where(m, token_loss(head(h), tg), 0.0)),
                            lambda: jnp.zeros((), jnp.float32))

    sums = jax.lax.map(chunk_loss, (chunks(hidden), chunks(mask), jax.tree.map(chunks, targets)))
    return jnp.sum(sums), count
