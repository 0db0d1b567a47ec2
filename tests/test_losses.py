"""Distillation and next-token losses: hand-computed values, minimum at the teacher, chunking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas_jax.training import losses


def _logsoftmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_distillation_loss_matches_hand_computed_value():
    logits = np.array([[[2.0, 1.0, 0.0, -1.0], [0.5, 0.5, 3.0, 0.0]]], np.float32)  # [1, 2, 4]
    ids = np.array([[[0, 2], [2, 3]]], np.int32)
    lp = np.log(np.array([[[0.6, 0.2], [0.7, 0.1]]], np.float32))
    mask = np.array([[True, True]])
    # Renormalised teacher: [0.75, 0.25] and [0.875, 0.125].
    s = _logsoftmax(logits[0])
    want = (-(0.75 * s[0, 0] + 0.25 * s[0, 2]) - (0.875 * s[1, 2] + 0.125 * s[1, 3])) / 2
    got = losses.distillation_loss(logits, ids, lp, mask)
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    only_first = losses.distillation_loss(logits, ids, lp, np.array([[True, False]]))
    np.testing.assert_allclose(float(only_first), -(0.75 * s[0, 0] + 0.25 * s[0, 2]), rtol=1e-6)


def test_mass_keeps_best_tokens_up_to_the_threshold():
    lp = np.log(np.array([0.5, 0.3, 0.15, 0.04], np.float32))
    q = np.asarray(losses.teacher_probs(lp, mass=0.8))
    # Mass before each token: 0, 0.5, 0.8, 0.95 -> the first two stay.
    np.testing.assert_allclose(q, [0.625, 0.375, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(losses.teacher_probs(lp)), [0.5, 0.3, 0.15, 0.04]
                               / np.float32(0.99), rtol=1e-6)
    logits = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    ids = np.array([3, 0, 1, 2], np.int32)
    s = _logsoftmax(logits)
    got = losses.distillation_token_loss(logits, ids, lp, mass=0.8)
    np.testing.assert_allclose(float(got), -(0.625 * s[3] + 0.375 * s[0]), rtol=1e-6)


def test_loss_is_teacher_entropy_when_student_equals_teacher():
    v = 16
    rng = np.random.default_rng(0)
    teacher_logits = rng.normal(size=(2, 3, v)).astype(np.float32) * 2
    t_lp = _logsoftmax(teacher_logits)
    order = np.argsort(-t_lp, axis=-1)  # k = V, best first
    ids = order.astype(np.int32)
    lps = np.take_along_axis(t_lp, order, -1).astype(np.float32)
    mask = np.ones((2, 3), bool)
    entropy = float(np.mean(-(np.exp(t_lp) * t_lp).sum(-1)))
    at_teacher = float(losses.distillation_loss(teacher_logits, ids, lps, mask))
    np.testing.assert_allclose(at_teacher, entropy, rtol=1e-5)
    for scale in (0.9, 1.1):
        off = float(losses.distillation_loss(teacher_logits * scale, ids, lps, mask))
        assert off > at_teacher + 1e-4
    grad = jax.grad(lambda x: losses.distillation_loss(x, ids, lps, mask))(
        jnp.asarray(teacher_logits))
    np.testing.assert_allclose(np.asarray(grad), 0.0, atol=1e-6)


def test_next_token_loss_targets_the_following_token():
    logits = np.log(np.array([[[0.1, 0.2, 0.7], [0.5, 0.25, 0.25], [0.3, 0.3, 0.4]]],
                             np.float32))
    tokens = np.array([[0, 2, 1]], np.int32)
    mask = np.array([[True, True, False]])
    # Position 0 predicts token 2 (p 0.7), position 1 predicts token 1 (p 0.25).
    want = -(np.log(0.7) + np.log(0.25)) / 2
    np.testing.assert_allclose(float(losses.next_token_loss(logits, tokens, mask)), want,
                               rtol=1e-6)


def test_masked_mean_ignores_unmasked_garbage_and_empty_mask():
    x = jnp.array([1.0, jnp.inf, 3.0])
    assert float(losses.masked_mean(x, jnp.array([True, False, True]))) == 2.0
    assert float(losses.masked_mean(x, jnp.zeros(3, bool))) == 0.0
    logits = jnp.full((1, 2, 5), 1e30).at[0, 1].set(0.0)
    ids = jnp.zeros((1, 2, 3), jnp.int32)
    lp = jnp.zeros((1, 2, 3))
    val, grad = jax.value_and_grad(losses.distillation_loss)(
        logits, ids, lp, jnp.array([[False, True]]))
    assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("kind", losses.LOSS_KINDS)
@pytest.mark.parametrize("chunk", [3, 7, 16])  # 4 chunks of 3, 2 of 5, one plain
def test_chunked_loss_from_hidden_matches_dense_loss(kind, chunk):
    b, t, d, v, k = 3, 10, 6, 12, 4
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    ids = jnp.asarray(rng.integers(0, v, (b, t, k)), jnp.int32)
    lp = jnp.asarray(-np.sort(rng.random((b, t, k)), -1) - 0.5, jnp.float32)
    mask = np.zeros((b, t), bool)
    mask[0, 2:9] = True
    mask[1, [1, 5, 7]] = True  # row 2 has none: its chunks past row 0/1's tokens are skipped
    mask = jnp.asarray(mask)
    head = lambda h, w: h @ w

    def dense(hidden, w):
        logits = head(hidden, w)
        if kind == losses.DISTILLATION:
            return losses.distillation_loss(logits, ids, lp, mask, mass=0.9)
        return losses.next_token_loss(logits, tokens, mask)

    def chunked(hidden, w):
        targets = ({"teacher_ids": ids, "teacher_logprobs": lp} if kind == losses.DISTILLATION
                   else {"next_ids": losses.next_token_targets(tokens)})
        total, count = losses.masked_loss_from_hidden(
            lambda h: head(h, w), hidden, targets, mask, losses.token_loss_fn(kind, 0.9), chunk)
        return total / count, count

    want, want_g = jax.value_and_grad(dense, argnums=(0, 1))(hidden, w)
    (got, count), got_g = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True))(
        hidden, w)
    assert float(count) == 10
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for g, wg in zip(got_g, want_g):
        np.testing.assert_allclose(np.asarray(g), np.asarray(wg), atol=1e-6)
