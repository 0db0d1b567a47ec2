"""Sampler: top-p filtering, greedy = argmax decoding, stop ids, bucketing, prefix."""

import jax
import jax.numpy as jnp
import numpy as np

from cas_jax import model as model_lib, sampling
from cas_jax.config import ModelConfig

CFG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0)


def _params(seed=0):
    return model_lib.init_params(CFG, jax.random.PRNGKey(seed))


def _greedy_reference(params, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        logits, _ = model_lib.forward_jit(params, jnp.asarray([seq]),
                                          jnp.arange(len(seq))[None], config=CFG)
        seq.append(int(jnp.argmax(logits[0, -1])))
    return seq[len(prompt):]


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
    before = sampling._generate._cache_size()
    sampling.generate(params, CFG, [[1, 2, 3, 4, 5, 6]], sp)
    sampling.generate(params, CFG, [[7, 7, 7, 7], [1]], sampling.SamplingParams(
        max_new_tokens=4, temperature=0.5))
    assert sampling._generate._cache_size() == before


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
