"""Sampler: top-p filtering, greedy = argmax decoding, stop ids, bucketing, prefix, repetition
controls."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cas_jax.model import llama as model_lib, sampling
from cas_jax.model.config import ModelConfig

CFG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0)


def _params(seed=0):
    return model_lib.init_params(CFG, jax.random.PRNGKey(seed))


def _greedy_reference(params, prompt, n, penalize=lambda logits, generated: logits):
    """Step-by-step greedy decoding; penalize(logits [V] np, generated tokens) -> logits."""
    seq = list(prompt)
    for _ in range(n):
        logits, _ = model_lib.forward_jit(params, jnp.asarray([seq]),
                                          jnp.arange(len(seq))[None], config=CFG)
        logits = penalize(np.asarray(logits[0, -1], np.float64), seq[len(prompt):])
        seq.append(int(np.argmax(logits)))
    return seq[len(prompt):]


def _np_penalize(logits, generated, rep=1.0, freq=0.0, pres=0.0, ngram=0):
    """Reference repetition controls over the generated tokens, one token at a time."""
    x = logits.copy()
    for t in set(generated):
        c = generated.count(t)
        x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
        x[t] -= freq * c + pres
    if ngram and len(generated) >= ngram - 1:
        tail = generated[len(generated) - ngram + 1:]
        for j in range(ngram - 1, len(generated)):
            if generated[j - ngram + 1:j] == tail:
                x[generated[j]] = -np.inf
    return x


def _bigram_repeats(row):
    grams = list(zip(row, row[1:]))
    return len(grams) - len(set(grams))


# Greedily, _params(0) loops on these prompts (checked where it matters).
LOOPING = [[3, 3, 3, 3], [1, 2, 3], [9, 8, 7, 6], [4, 5]]


def test_greedy_matches_step_by_step_argmax_with_ragged_prompts():
    params = _params()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [3, 3, 3, 3]]
    outs = sampling.generate(params, CFG, prompts, sampling.SamplingParams(max_new_tokens=6))
    for p, o in zip(prompts, outs):
        assert o == _greedy_reference(params, p, 6)


def test_stop_ids_end_rows_independently():
    params = _params()
    prompts = [[1, 2, 3], [4, 5]]
    free = sampling.generate(params, CFG, prompts, sampling.SamplingParams(max_new_tokens=8))
    stop = free[0][2]
    outs = sampling.generate(params, CFG, prompts,
                             sampling.SamplingParams(max_new_tokens=8, stop_ids=(stop,)))
    assert outs[0] == free[0][:free[0].index(stop) + 1]
    want1 = free[1][:free[1].index(stop) + 1] if stop in free[1] else free[1]
    assert outs[1] == want1


def test_top_p_keeps_only_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    sample = jax.jit(sampling.sample_logits)
    seen = {int(sample(logits, jax.random.PRNGKey(i), jnp.float32(1.0), jnp.float32(0.7))[0])
            for i in range(200)}
    assert seen == {0, 1}
    everything = {int(sample(logits, jax.random.PRNGKey(i), jnp.float32(1.0),
                             jnp.float32(1.0))[0]) for i in range(200)}
    assert everything == {0, 1, 2, 3}
    greedy = sample(logits, jax.random.PRNGKey(0), jnp.float32(0.0), jnp.float32(0.7))
    assert int(greedy[0]) == 0


def test_sampling_is_seeded():
    params = _params()
    sp = sampling.SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95)
    a = sampling.generate(params, CFG, [[1, 2]], sp, seed=3)
    b = sampling.generate(params, CFG, [[1, 2]], sp, seed=3)
    assert a == b


def test_new_prompt_lengths_in_a_bucket_do_not_recompile():
    params = _params()
    sp = sampling.SamplingParams(max_new_tokens=5)
    sampling.generate(params, CFG, [[1, 2, 3]], sp)
    before = sampling.compiled_programs()
    sampling.generate(params, CFG, [[1, 2, 3, 4, 5, 6]], sp)
    sampling.generate(params, CFG, [[7, 7, 7, 7], [1]], sampling.SamplingParams(
        max_new_tokens=4, temperature=0.5))
    assert sampling.compiled_programs() == before


def test_generation_honors_prefix():
    params = _params()
    ctx = [5, 6, 7, 8, 9]
    prompt = [1, 2, 3]
    k, v = model_lib.prefill_kv(params, jnp.asarray([ctx]), jnp.arange(5)[None], config=CFG)
    prefix = {"k": k, "v": v, "mask": jnp.ones((1, 5), bool)}
    sp = sampling.SamplingParams(max_new_tokens=6)
    with_prefix = sampling.generate(params, CFG, [prompt], sp, prefix=prefix)
    in_context = sampling.generate(params, CFG, [ctx + prompt], sp)
    assert with_prefix == in_context
    assert with_prefix != sampling.generate(params, CFG, [prompt], sp)
    np.testing.assert_equal(len(with_prefix[0]), 6)
    # batch-1 prefix shared by three ragged rows == each row with the context inline
    rows = [prompt, [4, 4], [7, 1, 2, 9, 9]]
    shared = sampling.generate(params, CFG, rows, sp, prefix=prefix)
    assert shared == [sampling.generate(params, CFG, [ctx + r], sp)[0] for r in rows]


def test_no_repeat_ngram_size_2_leaves_no_repeated_bigram():
    params = _params()
    free = sampling.generate(params, CFG, LOOPING, sampling.SamplingParams(max_new_tokens=24))
    assert all(_bigram_repeats(o) > 0 for o in free)  # premise: the model loops
    sp = sampling.SamplingParams(max_new_tokens=24, no_repeat_ngram_size=2)
    outs = sampling.generate(params, CFG, LOOPING, sp)
    assert all(len(o) == 24 and _bigram_repeats(o) == 0 for o in outs)
    sampled = sampling.generate(params, CFG, LOOPING, dataclasses.replace(
        sp, temperature=0.7), seed=1)
    assert all(_bigram_repeats(o) == 0 for o in sampled)


def test_penalised_greedy_matches_step_by_step_reference():
    params = _params()
    cases = [dict(rep=1.3), dict(freq=0.4), dict(pres=0.6), dict(ngram=3),
             dict(rep=0.8, freq=-0.1, pres=0.2, ngram=1)]
    for kw in cases:
        sp = sampling.SamplingParams(
            max_new_tokens=16, repetition_penalty=kw.get("rep", 1.0),
            frequency_penalty=kw.get("freq", 0.0), presence_penalty=kw.get("pres", 0.0),
            no_repeat_ngram_size=kw.get("ngram", 0))
        outs = sampling.generate(params, CFG, LOOPING, sp)
        changed = False
        for p, o in zip(LOOPING, outs):
            want = _greedy_reference(params, p, 16, lambda x, g: _np_penalize(x, g, **kw))
            assert o == want, kw
            changed |= want != _greedy_reference(params, p, 16)
        assert changed, kw  # the control had an effect, so the comparison means something


def test_penalties_change_the_token_as_the_numpy_reference_does():
    v = CFG.vocab_size
    logits = np.full((3, v), -5.0, np.float32)
    logits[0, :2] = [3.0, 2.9]     # seen once; positive: 3.0 / 1.2 = 2.5 < 2.9
    logits[1, :2] = [-0.5, -0.55]  # seen once; negative: -0.5 * 1.2 = -0.6 < -0.55
    logits[2, :2] = [3.0, 2.5]     # token 0 seen 3 times, token 1 once
    generated = [[0], [0], [0, 0, 1, 0]]
    counts = np.zeros((3, v), np.int32)
    out = np.zeros((3, 8), np.int32)
    for b, g in enumerate(generated):
        out[b, :len(g)] = g
        np.add.at(counts[b], g, 1)
    penalize = jax.jit(sampling.penalize_logits)
    for rep, freq, pres in [(1.2, 0.0, 0.0), (1.0, 0.3, 0.0), (1.0, 0.0, 0.5), (1.1, 0.1, 0.2)]:
        got = np.asarray(penalize(jnp.asarray(logits), jnp.asarray(counts), jnp.asarray(out),
                                  jnp.int32(4), (jnp.float32(rep), jnp.float32(freq),
                                                 jnp.float32(pres), jnp.int32(0))))
        for b, g in enumerate(generated):
            np.testing.assert_allclose(got[b], _np_penalize(logits[b], g, rep, freq, pres),
                                       rtol=1e-6)
        want = {(1.2, 0.0, 0.0): [1, 1, 0],  # row 2: 3 / 1.2 > 2.5 / 1.2
                (1.0, 0.3, 0.0): [1, 1, 1],  # row 2: 3 - 0.9 < 2.5 - 0.3: counts matter
                (1.0, 0.0, 0.5): [1, 1, 0]}  # row 2: 3 - 0.5 > 2.5 - 0.5: presence does not
        if (rep, freq, pres) in want:
            assert np.argmax(got, axis=1).tolist() == want[rep, freq, pres]
    assert np.argmax(logits, axis=1).tolist() == [0, 0, 0]


def test_penalties_count_generated_tokens_only():
    params = _params()
    prompt = LOOPING[0]
    free = sampling.generate(params, CFG, [prompt], sampling.SamplingParams(max_new_tokens=8))[0]
    # prompt + free[:4] continues with free[4:] greedily; that continuation repeats its prompt
    prompt = prompt + free[:4]
    assert free[4] in free[:4]
    sp = sampling.SamplingParams(max_new_tokens=1, repetition_penalty=10.0,
                                 frequency_penalty=5.0, presence_penalty=5.0,
                                 no_repeat_ngram_size=1)
    assert sampling.generate(params, CFG, [prompt], sp)[0] == [free[4]]
    assert sampling.generate(params, CFG, [prompt], dataclasses.replace(
        sp, max_new_tokens=4))[0][1:] != free[5:8]  # from the second token on they bite


def test_changing_penalty_values_does_not_recompile():
    params = _params()
    sampling.generate(params, CFG, [[1, 2]], sampling.SamplingParams(max_new_tokens=5))
    before = sampling.compiled_programs()
    for sp in [sampling.SamplingParams(max_new_tokens=5, repetition_penalty=1.3),
               sampling.SamplingParams(max_new_tokens=5, frequency_penalty=0.5,
                                       presence_penalty=0.1, no_repeat_ngram_size=3),
               sampling.SamplingParams(max_new_tokens=5, no_repeat_ngram_size=8,
                                       temperature=1.0)]:
        sampling.generate(params, CFG, [[1, 2]], sp)
    assert sampling.compiled_programs() == before
