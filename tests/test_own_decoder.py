"""Cartridges for a decoder cas_jax does not know: a small Flax NNX decoder written here, run
by cas_jax's trainer, composition, scoring, prefilling, sampler, self-study (agents and
teacher) and the `document_kv` init through `cas_jax.Decoder` (and `CompressibleKV`)."""

import dataclasses
import functools
import json
import math

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cas_jax.cartridges import attention, cartridge as cart_lib, kv_compression
from cas_jax.documents.corpus import Document
from cas_jax.evaluation import scoring
from cas_jax.model import decoder as decoder_lib, sampling
from cas_jax.model.loading import LoadedModel
from cas_jax.training import synthesis, teacher, train as train_lib

V, D, L, H, K, DH, MAX_POS = 53, 32, 2, 4, 2, 8, 256
SEQ, TOPK, DOC_LEN, P = 24, 8, 40, 8
TRAIN = train_lib.TrainConfig(lr=0.05, logits_chunk=8)


def rope(x, positions):
    """x [B, T, N, DH] rotated by positions [B, T] (keys are kept rotated, as cas_jax's)."""
    angles = positions.astype(jnp.float32)[:, :, None, None] * (
        10000.0 ** (-jnp.arange(0, DH, 2) / DH))[None, None, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Block(nnx.Module):
    """Pre-norm attention (grouped kv heads, rotary positions) and a GELU MLP."""

    def __init__(self, rngs: nnx.Rngs):
        self.attn_norm = nnx.RMSNorm(D, rngs=rngs)
        self.q = nnx.Linear(D, H * DH, use_bias=False, rngs=rngs)
        self.kv = nnx.Linear(D, 2 * K * DH, use_bias=False, rngs=rngs)
        self.o = nnx.Linear(H * DH, D, use_bias=False, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(D, rngs=rngs)
        self.up = nnx.Linear(D, 2 * D, rngs=rngs)
        self.down = nnx.Linear(2 * D, D, rngs=rngs)

    def project(self, x, positions):
        """-> queries [B, T, H, DH], keys (both rotated) and values [B, T, K, DH]."""
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = rope(self.q(h).reshape(b, t, H, DH), positions)
        k, v = jnp.split(self.kv(h).reshape(b, t, 2 * K, DH), 2, axis=2)
        return q, rope(k, positions), v

    def __call__(self, x, positions, prefix, cache):
        """-> (x, this layer's K/V: the new tokens', or the updated cache's, and the attention
        probabilities [B, H, T, keys])."""
        b, t, _ = x.shape
        q, k, v = self.project(x, positions)
        key_pos = positions
        if cache is not None:  # write this call's K/V at the cache's index, then read it all
            ck, cv, key_pos, index = cache
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
        keys, values = k, v
        visible = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= positions[:, :, None])
        scale = jnp.ones((b, keys.shape[1]), jnp.float32)
        bias = jnp.zeros((b, keys.shape[1]), jnp.float32)
        if prefix is not None:  # its slots come first; a batch of 1 is shared by every row
            pk, pv, mask, p_scale, p_bias = prefix
            n = pk.shape[1]
            keys = jnp.concatenate([jnp.broadcast_to(pk, (b,) + pk.shape[1:]), keys], axis=1)
            values = jnp.concatenate([jnp.broadcast_to(pv, (b,) + pv.shape[1:]), values], axis=1)
            visible = jnp.concatenate([jnp.broadcast_to(mask[:, None, :], (b, t, n)), visible],
                                      axis=2)
            if p_scale is not None:
                scale = jnp.concatenate([jnp.broadcast_to(p_scale, (b, n)), scale], axis=1)
                bias = jnp.concatenate([jnp.broadcast_to(p_bias, (b, n)), bias], axis=1)
            else:
                scale = jnp.concatenate([jnp.ones((b, n), jnp.float32), scale], axis=1)
                bias = jnp.concatenate([jnp.zeros((b, n), jnp.float32), bias], axis=1)
        keys, values = jnp.repeat(keys, H // K, axis=2), jnp.repeat(values, H // K, axis=2)
        s = jnp.einsum("bthd,bshd->bhts", q, keys) / math.sqrt(DH)
        s = s * scale[:, None, None, :] + bias[:, None, None, :]
        probs = jax.nn.softmax(jnp.where(visible[:, None], s, -1e30), axis=-1)
        out = jnp.einsum("bhts,bshd->bthd", probs, values).reshape(b, t, H * DH)
        x = x + self.o(out)
        return x + self.down(jax.nn.gelu(self.up(self.mlp_norm(x)))), (k, v), probs


class TinyLM(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, vocab: int = V):
        self.embed = nnx.Embed(vocab, D, rngs=rngs)
        self.blocks = nnx.List([Block(rngs) for _ in range(L)])
        self.norm = nnx.RMSNorm(D, rngs=rngs)

    def __call__(self, tokens, positions, cache=None, prefix=None):
        x = self.embed(tokens)
        if cache is not None:
            new_pos = jnp.where(positions >= 0, positions, -1).astype(jnp.int32)
            cache_pos = jax.lax.dynamic_update_slice(cache["pos"], new_pos, (0, cache["index"]))
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            pre = None if prefix is None else (
                prefix["k"][i], prefix["v"][i], prefix["mask"], prefix.get("logit_scale"),
                prefix.get("logit_bias"))
            layer_cache = None if cache is None else (cache["k"][i], cache["v"][i], cache_pos,
                                                      cache["index"])
            x, (k, v), _ = block(x, positions, pre, layer_cache)
            ks.append(k)
            vs.append(v)
        kv = {"k": jnp.stack(ks), "v": jnp.stack(vs)}
        if cache is not None:
            kv.update(pos=cache_pos, index=cache["index"] + tokens.shape[1])
        return self.norm(x), kv

    def queries(self, tokens, positions):
        """[L, B, T, H, DH]: every block's queries (no prefix, no cache)."""
        return jnp.stack(self._blocks(tokens, positions, lambda q, probs: q))

    def attention(self, tokens, positions):
        """[L, B, H, T, T]: every block's attention probabilities (no prefix, no cache)."""
        return jnp.stack(self._blocks(tokens, positions, lambda q, probs: probs))

    def _blocks(self, tokens, positions, pick):
        x, out = self.embed(tokens), []
        for block in self.blocks:
            q = block.project(x, positions)[0]
            x, _, probs = block(x, positions, None, None)
            out.append(pick(q, probs))
        return out


@dataclasses.dataclass(frozen=True)
class NNXDecoder:
    """TinyLM as a `cas_jax.Decoder`: its graph is static, its nnx.State is the params."""

    graphdef: nnx.GraphDef
    num_layers: int = L
    num_kv_heads: int = K
    head_dim: int = DH
    vocab_size: int = V
    max_position_embeddings: int = MAX_POS

    def forward(self, params, tokens, positions, cache=None, prefix=None, *, remat=False):
        return nnx.merge(self.graphdef, params)(tokens, positions, cache, prefix)

    def logits(self, params, hidden):
        return nnx.merge(self.graphdef, params).embed.attend(hidden).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class CompressibleNNXDecoder(NNXDecoder):
    """NNXDecoder with the optional `CompressibleKV` methods the `document_kv` init needs."""

    def queries(self, params, tokens, positions):
        return nnx.merge(self.graphdef, params).queries(tokens, positions)

    def move_keys(self, keys, delta):
        n_layers, n, kh, dh = keys.shape
        return rope(keys.reshape(n_layers, n * kh, 1, dh),
                    delta.reshape(n_layers, n * kh)).reshape(keys.shape)


@functools.partial(jax.jit, static_argnums=0)
def _logprobs(dec, params, tokens, positions, prefix=None):
    """[B, T, V] next-token log-probabilities from one plain forward of `dec`."""
    hidden, _ = dec.forward(params, tokens, positions, None, prefix)
    return jax.nn.log_softmax(dec.logits(params, hidden))


def _teacher_rows(dec, params, doc, seeds):
    """Rows of the trainer's batch format; the teacher reads `doc` before the conversation."""
    rng = [np.random.default_rng(seed) for seed in seeds]
    lengths = np.asarray([int(r.integers(16, SEQ + 1)) for r in rng], np.int32)
    tokens = np.zeros((len(rng), SEQ), np.int32)
    mask = np.zeros((len(rng), SEQ), bool)
    for i, (r, n) in enumerate(zip(rng, lengths)):
        tokens[i, :n] = r.integers(0, V, n)
        mask[i, n // 3:n - 1] = True
    full = np.concatenate([np.broadcast_to(doc, (len(rng), DOC_LEN)), tokens], axis=1)
    t = np.arange(DOC_LEN + SEQ)[None]
    positions = np.where(t < DOC_LEN + lengths[:, None], t, -1)
    lp, ids = jax.device_get(jax.lax.top_k(_logprobs(dec, params, full, positions)[:, DOC_LEN:],
                                           TOPK))
    pad = ~(np.arange(SEQ)[None] < lengths[:, None])[..., None]
    return [{"tokens": tokens[i], "length": lengths[i], "loss_mask": mask[i],
             "teacher_ids": np.where(pad[i], 0, ids[i]).astype(np.int32),
             "teacher_logprobs": np.where(pad[i], 0, lp[i]).astype(np.float32)}
            for i in range(len(rng))]


def _stack(rows):
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _train(dec, params, doc, seed):
    """A cartridge for `doc` trained by cas_jax's trainer -> (cartridge, held-out loss before,
    after, the trainer's reports)."""
    examples = _teacher_rows(dec, params, doc, range(seed, seed + 32))
    held_out = _stack(_teacher_rows(dec, params, doc, range(seed + 1000, seed + 1016)))
    c = cart_lib.init_random_tokens(dec, params, P, jax.random.PRNGKey(seed), fingerprint="own",
                                    doc_id=f"doc{seed}")
    state = train_lib.init_train_state([c], TRAIN)
    loss = jax.jit(lambda cs: train_lib.loss_fn(cs, params, held_out, config=dec,
                                                train_config=TRAIN)[0])
    before = float(loss(state.cartridges))
    data = iter(grain.MapDataset.source(examples).shuffle(0).repeat(None).to_iter_dataset()
                .batch(8))
    reports = []
    state = train_lib.train(state, params, data, config=dec, train_config=TRAIN,
                            mesh=train_lib.make_mesh(1), num_steps=30, log_every=10,
                            on_report=reports.append)
    after = float(loss(state.cartridges))
    (trained,) = train_lib.cartridges_from_state(state, [c.meta])
    return trained, before, after, reports


@pytest.fixture(scope="module")
def setup():
    graphdef, params = nnx.split(TinyLM(nnx.Rngs(0)))
    dec = NNXDecoder(graphdef)
    rng = np.random.default_rng(7)
    docs = [rng.integers(0, V, DOC_LEN).astype(np.int32) for _ in range(2)]
    trained = [_train(dec, params, doc, seed) for seed, doc in zip((0, 100), docs)]
    return dec, params, docs, trained


def test_the_nnx_decoder_conforms():
    dec = NNXDecoder(nnx.split(TinyLM(nnx.Rngs(0)))[0])
    assert isinstance(dec, decoder_lib.Decoder)
    assert not isinstance(object(), decoder_lib.Decoder)


def test_cas_jax_trains_a_cartridge_for_it(setup):
    dec, params, _, trained = setup
    for cartridge, before, after, reports in trained:
        assert cartridge.keys.shape == (L, P, K, DH)
        assert [r.step for r in reports] == [10, 20, 30]
        assert reports[-1].loss < reports[0].loss
        assert after < before - 0.3, (before, after)


def _direct_logprobs(dec, params, prefix, rows, width=16):
    """Log-probabilities [len(rows), width, V] of the next token after each of `rows`' tokens
    behind `prefix`, from one plain forward (rows right-padded, padding at position -1)."""
    tokens = np.zeros((len(rows), width), np.int32)
    positions = np.full((len(rows), width), -1, np.int32)
    start = int(attention.num_prefix_tokens(prefix, 1)[0])
    for i, r in enumerate(rows):
        tokens[i, :len(r)], positions[i, :len(r)] = r, start + np.arange(len(r))
    return np.asarray(_logprobs(dec, params, tokens, positions, prefix))


def test_composed_cartridges_score_and_sample_with_it(setup):
    dec, params, _, trained = setup
    carts = [t[0] for t in trained]
    bank = attention.bank_from_cartridges(carts)
    model = LoadedModel(config=dec, params=params, tokenizer=None, fingerprint="own", path="")
    prompts, conts = [[3, 4, 5], [9, 1]], [[7, 8, 2], [11, 12]]
    composed = attention.compose(bank, jnp.asarray([[0, 1]], jnp.int32), jnp.ones((1, 2), bool))
    assert int(composed["start"][0]) == 2 * P - 1  # one sink for the pair
    got = scoring.score_continuations(model, prompts, conts, bank=bank,
                                      selections=[[0, 1]] * 2, slots=2)
    alone = scoring.score_continuations(model, prompts, conts)
    direct = _direct_logprobs(dec, params, composed, [p + c for p, c in zip(prompts, conts)])
    for i, (p, c) in enumerate(zip(prompts, conts)):
        want = direct[i, len(p) - 1 + np.arange(len(c)), c]
        np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-5)
        assert np.abs(got[i] - alone[i]).max() > 1e-3  # the cartridges change the scores
    tempered = scoring.score_continuations(model, prompts, conts, bank=bank,
                                           selections=[[0, 1]] * 2, slots=2,
                                           geometry=attention.Geometry(temperature=0.5))
    assert np.abs(tempered[0] - got[0]).max() > 1e-4  # logit_scale is honoured

    # The sampler (prefill, then a KV-cache decode loop) agrees with greedy full forwards.
    prompt = [5, 6, 7, 8]
    (out,) = sampling.generate(params, dec, [prompt], sampling.SamplingParams(max_new_tokens=6),
                               prefix=composed)
    seq = list(prompt)
    for _ in range(6):
        seq.append(int(np.argmax(_direct_logprobs(dec, params, composed, [seq])[0, len(seq) - 1])))
    assert out == seq[len(prompt):]


def test_exact_prefill_of_a_context_with_it(setup):
    """`scoring.prefill_contexts` (chunked, through a KV cache) gives the K/V one forward
    gives: the ICL baseline's exact cartridge."""
    dec, params, docs, _ = setup
    model = LoadedModel(config=dec, params=params, tokenizer=None, fingerprint="own", path="")
    (exact,) = scoring.prefill_contexts(model, [list(docs[0])], ["doc"], chunk_tokens=16)
    _, kv = dec.forward(params, jnp.asarray(docs[0][None]), jnp.arange(DOC_LEN)[None])
    assert exact.keys.shape == (L, DOC_LEN, K, DH)
    np.testing.assert_allclose(exact.keys, kv["k"][:, 0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(exact.values, kv["v"][:, 0], rtol=1e-4, atol=1e-5)


def test_document_kv_init_with_it(setup):
    """The `document_kv` init through the contract: the decoder's forward gives the K/V, its
    optional queries and move_keys (`CompressibleKV`) score the keys and move the kept ones."""
    dec, params, docs, _ = setup
    with pytest.raises(TypeError, match="queries/move_keys"):
        kv_compression.init_from_document_kv(dec, params, docs[0], P, fingerprint="own")
    dec = CompressibleNNXDecoder(dec.graphdef)
    assert isinstance(dec, decoder_lib.CompressibleKV)
    doc, positions = jnp.asarray(docs[0]), jnp.arange(DOC_LEN)[None]
    _, kv = dec.forward(params, doc[None], positions)
    keys, values, scores = kv_compression.key_scores(params, doc, config=dec)
    np.testing.assert_allclose(keys, kv["k"][:, 0], atol=1e-5)  # jitted vs eager
    np.testing.assert_allclose(values, kv["v"][:, 0], atol=1e-5)
    # A key's score is the attention the decoder itself pays it (its own softmax, read back
    # from its blocks): summed over the queries and the query heads of its kv head, divided by
    # the queries that see it.
    probs = np.asarray(nnx.merge(dec.graphdef, params).attention(doc[None], positions))[:, 0]
    want = probs.reshape(L, K, H // K, DOC_LEN, DOC_LEN).sum(axis=(2, 3)) / (
        DOC_LEN - np.arange(DOC_LEN))
    np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-7)

    whole = kv_compression.init_from_document_kv(dec, params, docs[0], DOC_LEN, fingerprint="own")
    np.testing.assert_allclose(whole.keys, keys, atol=1e-6)  # every position kept: the K/V
    np.testing.assert_array_equal(whole.values, values)
    c = kv_compression.init_from_document_kv(dec, params, docs[0], P, fingerprint="own", pool=1)
    assert c.keys.shape == c.values.shape == (L, P, K, DH) and c.meta.init == "document_kv"
    keep = kv_compression.select_positions(np.asarray(scores), P, pool=1)  # [L, K, P]
    assert np.all(keep[..., 0] == 0) and np.all(np.diff(keep, axis=-1) > 0)
    for layer in range(L):
        for head in range(K):
            kept = keep[layer, head]
            np.testing.assert_array_equal(c.values[layer, :, head], values[layer, kept, head])
            # A kept key sits at its slot: rotated back by (position - slot), it is the key the
            # document's forward gave at that position.
            back = rope(c.keys[layer, :, head][None, :, None], (kept - np.arange(P))[None])
            np.testing.assert_allclose(back[0, :, 0], keys[layer, kept, head], atol=1e-5)


def test_self_study_teacher_with_it(setup):
    """Self-study's teacher through the contract: the document blocks prefilled once (the
    agents' prefix too), the conversations run behind them, and the top-k kept at the targets
    are those of one plain forward of block + conversation."""
    dec, params, docs, _ = setup
    model = LoadedModel(config=dec, params=params, tokenizer=None, fingerprint="own", path="")
    rng = np.random.default_rng(5)
    blocks = [docs[0][:20].tolist(), docs[1][:31].tolist(), docs[0][:20].tolist()]
    convs = [rng.integers(0, V, n).tolist() for n in (20, 9, 20)]  # 40 tokens a row
    rows = [(np.asarray(b + c, np.int32), len(b) + np.arange(1, len(c) - 1))
            for b, c in zip(blocks, convs)]
    context = teacher.prefill_blocks(model, blocks)
    assert context.block.tolist() == [0, 1, 0]  # a block two rows share is prefilled once
    _, kv = dec.forward(params, jnp.asarray([blocks[1]]), jnp.arange(31)[None])
    np.testing.assert_allclose(context.k[:, 1, :31], kv["k"][:, 0], rtol=1e-5, atol=1e-6)
    for ctx in (context, None):
        got = teacher.teacher_targets(model, rows, ctx, topk=TOPK, batch_size=2)
        for (tokens, targets), (ids, logprobs) in zip(rows, got):
            lp = np.asarray(_logprobs(dec, params, tokens[None],
                                      np.arange(len(tokens))[None]))[0, targets]
            assert ids.shape == logprobs.shape == (len(targets), TOPK)
            np.testing.assert_allclose(np.take_along_axis(lp, ids, axis=1), logprobs, atol=1e-5)
            np.testing.assert_allclose(logprobs, -np.sort(-lp, axis=1)[:, :TOPK], atol=1e-5)


def test_self_study_synthesises_with_it(tokenizer):
    """A whole self-study batch (both agents sampled behind the prefilled chunk, then the
    teacher) with the NNX decoder over the real tokenizer's vocabulary."""
    graphdef, params = nnx.split(TinyLM(nnx.Rngs(1), vocab=len(tokenizer)))
    dec = NNXDecoder(graphdef, vocab_size=len(tokenizer), max_position_embeddings=2048)
    model = LoadedModel(config=dec, params=params, tokenizer=tokenizer, fingerprint="own",
                        path="")
    text = " ".join(f"Item {j} of the report has value {3 * j}." for j in range(30))
    study = synthesis.SelfStudy(model, {"d": Document("d", "Report", text)},
                                synthesis.SynthesisConfig(
                                    chunk_min=16, chunk_max=32, max_user_tokens=4,
                                    max_answer_tokens=6, topk=TOPK,
                                    family_weights=(0, 0, 1, 0, 0, 0, 0)))
    items = synthesis.work_items(["d"], 2, seed=0)
    convs, generated = study.run_batch(items)
    assert generated > 0 and len(convs) == 2
    for item, conv in zip(items, convs):
        plan = study.plan(item)
        plan.conversation = json.loads(conv.messages)
        assert [m["role"] for m in plan.conversation] == ["user", "assistant"]
        full, targets, student, mask = study.views(plan)
        np.testing.assert_array_equal(student, conv.tokens)
        assert mask.any() and np.array_equal(mask, conv.loss_mask)
        # The stored teacher rows are the top-k of one plain forward of chunk + conversation.
        lp = np.asarray(_logprobs(dec, params, full[None], np.arange(len(full))[None]))[0, targets]
        np.testing.assert_allclose(np.take_along_axis(lp, conv.teacher_ids, axis=1),
                                   conv.teacher_logprobs, atol=1e-5)
        np.testing.assert_allclose(conv.teacher_logprobs, -np.sort(-lp, axis=1)[:, :TOPK],
                                   atol=1e-5)
