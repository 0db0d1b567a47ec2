"""Cartridge initialisation, composition of a variable set, positions, gradients, model checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas_jax.cartridges import attention, cartridge as cart_lib, store
from cas_jax.model import llama as model_lib, loading
from conftest import cartridge_prefix, tiny_config

CONFIG = tiny_config(vocab_size=61, intermediate_size=48, max_position_embeddings=512)
FP = "tiny-fp"


@pytest.fixture(scope="module")
def params():
    return model_lib.init_params(CONFIG, jax.random.PRNGKey(0))


def _tokens(n, seed):
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, n).astype(np.int32)


def _forward_after_prefix(params, prefix, query):
    """Logits of query [B, T] with positions starting after each row's visible prefix."""
    b, t = query.shape
    n = attention.num_prefix_tokens(prefix, b)
    positions = n[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    logits, _ = model_lib.forward_jit(params, jnp.asarray(query), positions, prefix=prefix,
                                      config=CONFIG)
    return logits


def test_first_tokens_cartridge_equals_text_in_context(params):
    text, query = _tokens(24, 0), _tokens(9, 1)
    c = cart_lib.init_from_tokens(CONFIG, params, text, fingerprint=FP, doc_id="doc")
    assert c.keys.shape == (2, 24, 2, 8) and c.meta == cart_lib.CartridgeMeta(
        FP, "doc", 1, "first_tokens")
    full = np.concatenate([text, query])[None]
    want, _ = model_lib.forward_jit(params, jnp.asarray(full), jnp.arange(33)[None],
                                    config=CONFIG)
    got = _forward_after_prefix(params, cartridge_prefix(c), query[None])
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0, 24:]), atol=1e-5)
    # Positions matter: queries placed at 0 instead of after the prefix give other logits.
    wrong, _ = model_lib.forward_jit(params, jnp.asarray(query[None]), jnp.arange(9)[None],
                                     prefix=cartridge_prefix(c), config=CONFIG)
    assert np.abs(np.asarray(wrong) - np.asarray(got)).max() > 1e-3


def test_first_tokens_takes_a_prefix_of_the_document(params):
    doc = _tokens(30, 2)
    c = cart_lib.init_from_tokens(CONFIG, params, doc, fingerprint=FP, num_tokens=12)
    whole = cart_lib.init_from_tokens(CONFIG, params, doc, fingerprint=FP)
    np.testing.assert_allclose(np.asarray(c.keys), np.asarray(whole.keys[:, :12]), atol=1e-6)
    with pytest.raises(ValueError, match="fewer than the 40"):
        cart_lib.init_from_tokens(CONFIG, params, doc, fingerprint=FP, num_tokens=40,
                                  doc_id="short")
    with pytest.raises(ValueError, match="cannot freeze"):
        cart_lib.init_from_tokens(CONFIG, params, doc[:1], fingerprint=FP)


def test_random_tokens_is_the_kv_of_vocabulary_tokens(params):
    key = jax.random.PRNGKey(3)
    c = cart_lib.init_random_tokens(CONFIG, params, 16, key, fingerprint=FP, doc_id="d")
    assert c.meta.init == "random_tokens" and c.keys.shape == (2, 16, 2, 8)
    ids = jax.random.randint(key, (16,), 0, CONFIG.vocab_size, jnp.int32)
    same = cart_lib.init_from_tokens(CONFIG, params, np.asarray(ids), fingerprint=FP)
    np.testing.assert_array_equal(np.asarray(c.values), np.asarray(same.values))


def test_random_vectors_match_real_kv_statistics(params):
    ref = _tokens(200, 4)
    c = cart_lib.init_random_vectors(CONFIG, params, 4000, jax.random.PRNGKey(5), ref,
                                     fingerprint=FP, num_frozen=1)
    assert c.meta.init == "random_vectors" and c.keys.shape == (2, 4000, 2, 8)
    real_k, real_v = cart_lib.kv_of_tokens(CONFIG, params, ref)
    for got, real in ((c.keys, real_k), (c.values, real_v)):
        got, real = np.asarray(got), np.asarray(real)
        std = real.std(axis=1)
        np.testing.assert_allclose(got.mean(axis=1), real.mean(axis=1), atol=0.1 * std.max())
        np.testing.assert_allclose(got.std(axis=1), std, rtol=0.1)


def _bank(params, lengths, max_tokens):
    carts = [cart_lib.init_from_tokens(CONFIG, params, _tokens(n, 10 + i), fingerprint=FP,
                                       doc_id=f"d{i}") for i, n in enumerate(lengths)]
    return carts, attention.bank_from_cartridges(carts, capacity=len(lengths) + 1,
                                                 max_tokens=max_tokens)


def _concatenation(carts):
    """One cartridge holding the composition: the first sink, then every non-sink token."""
    keys = np.concatenate([np.asarray(carts[0].keys)]
                          + [np.asarray(c.keys[:, 1:]) for c in carts[1:]], axis=1)
    values = np.concatenate([np.asarray(carts[0].values)]
                            + [np.asarray(c.values[:, 1:]) for c in carts[1:]], axis=1)
    return cart_lib.Cartridge(jnp.asarray(keys), jnp.asarray(values), carts[0].meta)


def test_composed_cartridges_equal_one_cartridge_of_their_concatenation(params):
    carts, bank = _bank(params, [7, 12, 5], max_tokens=12)
    query = _tokens(6, 20)[None]
    prefix = attention.compose(bank, jnp.array([[2, 0, 3, 1]]),
                               jnp.array([[True, True, False, True]]))
    assert int(attention.num_prefix_tokens(prefix, 1)[0]) == 5 + 7 + 12 - 2
    got = _forward_after_prefix(params, prefix, query)
    order = [carts[2], carts[0], carts[1]]
    want = _forward_after_prefix(params, cartridge_prefix(_concatenation(order)),
                                 query)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_each_row_reads_its_own_selection(params):
    _, bank = _bank(params, [7, 12, 5], max_tokens=12)
    selection = jnp.array([[0, 1], [2, 2], [1, 0], [0, 0]])
    selected = jnp.array([[True, True], [True, False], [True, True], [False, True]])
    query = np.stack([_tokens(6, 30 + i) for i in range(4)])
    got = _forward_after_prefix(params, attention.compose(bank, selection, selected), query)
    assert attention.num_prefix_tokens(attention.compose(bank, selection, selected),
                                       4).tolist() == [18, 5, 18, 7]
    for b in range(4):  # each row alone, with the others' selections removed
        alone = attention.compose(bank, jnp.tile(selection[b:b + 1], (4, 1)),
                                  jnp.tile(selected[b:b + 1], (4, 1)))
        want = _forward_after_prefix(params, alone, np.tile(query[b:b + 1], (4, 1)))
        np.testing.assert_allclose(np.asarray(got[b]), np.asarray(want[0]), atol=1e-5)


def test_changing_the_active_set_does_not_recompile(params):
    _, bank = _bank(params, [7, 12, 5], max_tokens=12)
    traces = []

    @jax.jit
    def run(bank, selection, selected, query):
        traces.append(1)
        return _forward_after_prefix(params, attention.compose(bank, selection, selected),
                                     query)

    query = jnp.asarray(np.stack([_tokens(6, 40), _tokens(6, 41)]))
    outs = []
    for sel, on in [([[0, 1, 2], [0, 0, 0]], [[True, True, True], [True, False, False]]),
                    ([[2, 0, 1], [1, 3, 3]], [[True, False, True], [True, True, True]]),
                    ([[3, 3, 3], [2, 1, 0]], [[True, False, False], [False, True, True]])]:
        outs.append(np.asarray(run(bank, jnp.array(sel), jnp.array(on), query)))
    _, other = _bank(params, [9, 3, 11], max_tokens=12)  # new cartridge values, same shapes
    outs.append(np.asarray(run(other, jnp.array(sel), jnp.array(on), query)))
    assert len(traces) == 1 and run._cache_size() == 1
    assert all(np.abs(a - b).max() > 1e-4 for a, b in zip(outs, outs[1:]))


def test_gradients_reach_every_active_cartridge(params):
    _, bank = _bank(params, [7, 12, 5], max_tokens=12)
    selection = jnp.array([[0, 2], [2, 3]])
    selected = jnp.array([[True, True], [True, False]])
    query = jnp.asarray(np.stack([_tokens(6, 50), _tokens(6, 51)]))

    def loss(keys, values):
        b = attention.CartridgeBank(keys, values, bank.lengths)
        logits = _forward_after_prefix(params, attention.compose(b, selection, selected), query)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 0])

    gk, gv = jax.grad(loss, argnums=(0, 1))(bank.keys, bank.values)
    per_token = np.abs(np.asarray(gk)).sum(axis=(1, 3, 4)) + np.abs(np.asarray(gv)).sum(
        axis=(1, 3, 4))  # [N, P_max]
    assert (per_token[0, :7] > 0).all() and (per_token[2, :5] > 0).all()
    assert (per_token[0, 7:] == 0).all() and (per_token[2, 5:] == 0).all()  # padding slots
    assert (per_token[1] == 0).all() and (per_token[3] == 0).all()  # inactive cartridges


def test_loading_a_cartridge_for_another_model_fails_clearly(params, tmp_path):
    c = cart_lib.init_from_tokens(CONFIG, params, _tokens(8, 60), fingerprint=FP, doc_id="fr")
    path = str(tmp_path / "fr_cartridge")
    store.save_cartridge(path, c)
    model = loading.LoadedModel(config=CONFIG, params=params, tokenizer=None, fingerprint=FP,
                                path="tiny")
    back = store.load_for_model(path, model)
    np.testing.assert_array_equal(np.asarray(back.keys), np.asarray(c.keys))
    assert back.meta == c.meta
    other = dataclasses.replace(model, fingerprint="other-model")
    with pytest.raises(cart_lib.CartridgeMismatchError, match="fr_cartridge.*other-model"):
        store.load_for_model(path, other)
    relaid = dataclasses.replace(model, config=dataclasses.replace(CONFIG, num_kv_heads=4))
    with pytest.raises(cart_lib.CartridgeMismatchError, match="fr_cartridge.*kv_heads=4"):
        store.load_for_model(path, relaid)


def test_document_kv_init_keeps_the_sink_and_the_most_attended_positions(params):
    from cas_jax.cartridges import kv_compression as kvc

    doc = _tokens(40, 7)
    # Keeping every position is the document's own KV cache (= init_from_tokens).
    whole = kvc.init_from_document_kv(CONFIG, params, doc, 40, fingerprint=FP, doc_id="d")
    ref = cart_lib.init_from_tokens(CONFIG, params, doc, fingerprint=FP, doc_id="d")
    np.testing.assert_allclose(whole.keys, ref.keys, atol=1e-5)
    np.testing.assert_allclose(whole.values, ref.values, atol=1e-6)
    keys, values, scores = kvc.key_scores(params, jnp.asarray(doc), config=CONFIG)
    assert scores.shape == (CONFIG.num_layers, CONFIG.num_kv_heads, 40)
    np.testing.assert_allclose(keys, ref.keys, atol=1e-5)  # the scan's K/V are the prefill's
    # Each window query's probabilities sum to one per query head: sum(score * visible) = G.
    seen = 40 - np.arange(40)  # window queries (all 40) that can see key j
    np.testing.assert_allclose((np.asarray(scores) * seen).sum(-1),
                               CONFIG.num_heads // CONFIG.num_kv_heads * 40, rtol=1e-4)
    keep = kvc.select_positions(np.asarray(scores), 8, pool=1)
    assert keep.shape == (2, 2, 8) and np.all(keep[..., 0] == 0)
    assert np.all(np.diff(keep, axis=-1) > 0)
    best = np.argsort(-np.asarray(scores)[0, 0, 1:])[:7] + 1
    assert set(keep[0, 0, 1:]) == set(best)
    c = kvc.init_from_document_kv(CONFIG, params, doc, 8, fingerprint=FP, pool=1)
    assert c.keys.shape == (2, 8, 2, 8) and c.meta.init == "document_kv"
    # Values are the kept positions' values; keys are re-rotated to slots 0..P-1.
    np.testing.assert_allclose(c.values[0, :, 0], ref.values[0, keep[0, 0], 0], atol=1e-6)
    inv = model_lib.rope_inv_freq(CONFIG)
    raw = model_lib.apply_rope(ref.keys[0][None, keep[0, 0]][:, :, :1],
                               -jnp.asarray(keep[0, 0])[None], inv)
    np.testing.assert_allclose(c.keys[0, :, :1], model_lib.apply_rope(
        raw, jnp.arange(8)[None], inv)[0], atol=1e-4)
    with pytest.raises(ValueError, match="keep"):
        kvc.select_positions(np.asarray(scores), 41)


# ----------------------------------------------------------------------------- geometry


def test_geometry_spec_round_trips_and_rejects_bad_names():
    g = attention.Geometry.parse("parallel, temperature=0.8,count_power=1")
    assert g == attention.Geometry("parallel", temperature=0.8, count_power=1.0)
    assert attention.Geometry.parse(str(g)) == g and str(attention.SERIAL) == "serial"
    with pytest.raises(ValueError, match="layout 'diagonal'"):
        attention.Geometry.parse("diagonal")
    with pytest.raises(ValueError, match="'temp=2' is not one of"):
        attention.Geometry.parse("parallel,temp=2")
    with pytest.raises(ValueError, match="must be > 0"):
        attention.Geometry("serial", temperature=0.0)


def test_relevance_routing_biases_each_cartridge_by_its_own_value(params):
    g = attention.Geometry.parse("parallel,count_power=0.5,relevance=2")
    assert g.relevance == 2.0 and attention.Geometry.parse(str(g)) == g
    assert str(g) == "parallel,count_power=0.5,relevance=2"
    with pytest.raises(ValueError, match="relevance and relevance_floor must be >= 0"):
        attention.Geometry("parallel", relevance=-1.0)
    _, bank = _bank(params, [7, 12, 5], max_tokens=12)
    selection = jnp.array([[2, 0, 1]])
    selected = jnp.array([[True, True, True]])
    with pytest.raises(ValueError, match="routes by relevance: its reader must pass"):
        attention.compose(bank, selection, selected, g)
    bias = jnp.array([[0.0, -1.0, -2.0]])
    prefix = attention.compose(bank, selection, selected, g, cartridge_bias=bias)
    plain = attention.compose(bank, selection, selected,
                              attention.Geometry("parallel", count_power=0.5))
    got = np.asarray(prefix["logit_bias"]).reshape(3, 12)
    want = np.asarray(plain["logit_bias"]).reshape(3, 12) + np.array([[0.0], [-1.0], [-2.0]])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    for key in ("k", "v", "mask", "start"):
        np.testing.assert_array_equal(np.asarray(prefix[key]), np.asarray(plain[key]))
    # A bias under the identity geometry adds the logit entries with only the bias in them.
    ident = attention.compose(bank, selection, selected, attention.PARALLEL, cartridge_bias=bias)
    np.testing.assert_allclose(np.asarray(ident["logit_bias"]).reshape(3, 12)[:, 0],
                               [0.0, -1.0, -2.0])
    assert "logit_bias" not in attention.compose(bank, selection, selected, attention.PARALLEL)


def test_an_effective_count_counts_the_set_by_its_routed_weights(params):
    g = attention.Geometry.parse("parallel,count_power=0.5,relevance=4,effective_count=1")
    assert g.effective_count == 1.0 and attention.Geometry.parse(str(g)) == g
    assert str(g) == "parallel,count_power=0.5,relevance=4,effective_count=1"
    with pytest.raises(ValueError, match="effective_count is 0 \\(off\\) or 1"):
        attention.Geometry("parallel", effective_count=0.5)
    _, bank = _bank(params, [7, 12, 5], max_tokens=12)
    selection = jnp.array([[2, 0, 1], [1, 2, 0]])
    selected = jnp.array([[True, True, True], [True, True, False]])
    bias = jnp.array([[0.0, -1.0, -3.0], [0.0, 0.0, 0.0]])
    got = np.asarray(attention.compose(bank, selection, selected, g, cartridge_bias=bias)
                     ["logit_bias"]).reshape(2, 3, 12)
    # Row 0: n = 1 + e^-1 + e^-3, not 3; row 1 (no routing) counts its 2 cartridges.
    n = 1.0 + np.exp(-1.0) + np.exp(-3.0)
    np.testing.assert_allclose(got[0, :, 0], -0.5 * np.log(n) + np.array([0.0, -1.0, -3.0]),
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[1, :2, 0], -0.5 * np.log(2.0), rtol=0, atol=1e-6)
    counted = attention.compose(bank, selection, selected,
                                attention.Geometry("parallel", count_power=0.5, relevance=4),
                                cartridge_bias=bias)
    np.testing.assert_allclose(np.asarray(counted["logit_bias"]).reshape(2, 3, 12)[0, :, 0],
                               -0.5 * np.log(3.0) + np.array([0.0, -1.0, -3.0]), atol=1e-5)


def test_a_routed_sink_is_the_best_routed_cartridges_and_unreshaped(params):
    g = attention.Geometry.parse("parallel,temperature=0.5,count_power=0.5,relevance=4,"
                                 "routed_sink=1")
    assert attention.Geometry.parse(str(g)) == g and g.routed_sink == 1.0
    _, bank = _bank(params, [7, 12, 5], max_tokens=12)
    selection = jnp.array([[2, 0, 1], [1, 2, 0]])
    selected = jnp.array([[True, True, True], [False, True, True]])
    bias = jnp.array([[-2.0, 0.0, -1.0], [0.0, -3.0, -1.0]])
    prefix = attention.compose(bank, selection, selected, g, cartridge_bias=bias)
    mask = np.asarray(prefix["mask"]).reshape(2, 3, 12)
    logit_bias = np.asarray(prefix["logit_bias"]).reshape(2, 3, 12)
    logit_scale = np.asarray(prefix["logit_scale"]).reshape(2, 3, 12)
    # Row 0: the second cartridge (bias 0) shows its sink; row 1: its first slot is not
    # selected, so the best active one is the third (-1 beats -3).
    assert mask[:, :, 0].tolist() == [[False, True, False], [False, False, True]]
    assert logit_bias[0, 1, 0] == 0.0 and logit_scale[0, 1, 0] == 1.0
    assert logit_bias[1, 2, 0] == 0.0 and logit_scale[1, 2, 0] == 1.0
    np.testing.assert_allclose(logit_bias[0, :, 1], -0.5 * np.log(3.0) + np.array([-2, 0, -1]),
                               atol=1e-5)
    assert np.all(logit_scale[0, :, 1:] == 2.0)
    # Everything but the sink is what the geometry without the option gives.
    plain = attention.compose(bank, selection, selected,
                              dataclasses.replace(g, routed_sink=0.0), cartridge_bias=bias)
    assert np.asarray(plain["mask"]).reshape(2, 3, 12)[:, :, 0].tolist() == \
        [[True, False, False], [False, True, False]]
    np.testing.assert_array_equal(np.asarray(plain["logit_bias"]).reshape(2, 3, 12)[:, :, 1:],
                                  logit_bias[:, :, 1:])
    np.testing.assert_array_equal(np.asarray(plain["start"]), np.asarray(prefix["start"]))


def test_parallel_queries_start_after_the_longest_cartridge(params):
    _, bank = _bank(params, [7, 12, 5], max_tokens=12)
    selection = jnp.array([[2, 0, 1], [1, 0, 0], [0, 0, 0]])
    selected = jnp.array([[True, True, True], [True, False, False], [False, False, True]])
    serial = attention.compose(bank, selection, selected, attention.SERIAL)
    parallel = attention.compose(bank, selection, selected, attention.PARALLEL)
    assert serial["start"].tolist() == [5 + 7 + 12 - 2, 12, 7]
    assert parallel["start"].tolist() == [12, 12, 7]
    assert [attention.query_start(c, attention.PARALLEL) for c in ([5, 7, 12], [12], [])] == \
        [12, 12, 0]
    assert attention.query_start([5, 7, 12], attention.SERIAL) == 22
    # One cartridge alone is read the same way by both layouts.
    query = _tokens(6, 60)[None]
    one_s = attention.compose(bank, selection[1:2], selected[1:2], attention.SERIAL)
    one_p = attention.compose(bank, selection[1:2], selected[1:2], attention.PARALLEL)
    np.testing.assert_array_equal(np.asarray(_forward_after_prefix(params, one_s, query)),
                                  np.asarray(_forward_after_prefix(params, one_p, query)))
    # Several are not: the queries sit at other distances from the keys.
    many = [attention.compose(bank, selection[:1], selected[:1], g)
            for g in (attention.SERIAL, attention.PARALLEL)]
    a, b = (np.asarray(_forward_after_prefix(params, p, query)) for p in many)
    assert np.abs(a - b).max() > 1e-4


def test_prefix_logit_scale_and_bias(params):
    """A prefix logit bias of log 2 weighs the cartridge as if its tokens were there twice;
    temperature and count_power reach compose's entries as 1/T and log(scale) - c log(n)."""
    (c,), _ = _bank(params, [9], max_tokens=9)
    query = jnp.asarray(_tokens(5, 61)[None])
    positions = 9 + jnp.arange(5, dtype=jnp.int32)[None]
    k, v = c.keys[:, None], c.values[:, None]
    twice = {"k": jnp.concatenate([k, k], axis=2), "v": jnp.concatenate([v, v], axis=2),
             "mask": jnp.ones((1, 18), bool)}
    biased = {"k": k, "v": v, "mask": jnp.ones((1, 9), bool),
              "logit_scale": jnp.ones((1, 9)), "logit_bias": jnp.full((1, 9), np.log(2.0))}
    want, _ = model_lib.forward_jit(params, query, positions, prefix=twice, config=CONFIG)
    got, _ = model_lib.forward_jit(params, query, positions, prefix=biased, config=CONFIG)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    plain, _ = model_lib.forward_jit(params, query, positions, prefix=biased | {
        "logit_bias": jnp.zeros((1, 9))}, config=CONFIG)
    assert np.abs(np.asarray(plain) - np.asarray(want)).max() > 1e-4

    _, bank = _bank(params, [7, 12, 5], max_tokens=12)
    g = attention.Geometry("parallel", temperature=0.5, scale=3.0, count_power=1.0)
    p = attention.compose(bank, jnp.array([[0, 1, 2], [1, 0, 0]]),
                          jnp.array([[True, True, True], [True, False, False]]), g)
    np.testing.assert_allclose(np.asarray(p["logit_scale"]), 2.0)
    np.testing.assert_allclose(np.asarray(p["logit_bias"][:, 0]),
                               [np.log(3.0) - np.log(3.0), np.log(3.0)], atol=1e-6)
    assert "logit_scale" not in attention.compose(bank, jnp.array([[0]]), jnp.array([[True]]))
