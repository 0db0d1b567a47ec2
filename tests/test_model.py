"""Decoder parity against transformers' PyTorch models, cache/prefix equivalences."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from cas_jax.model import decoder, llama as model_lib, weights  # noqa: E402

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            max_position_embeddings=256, rms_norm_eps=1e-5)

CASES = {
    "llama_mha_untied": ("llama", dict(num_attention_heads=4, num_key_value_heads=4,
                                       tie_word_embeddings=False)),
    "llama_gqa_tied": ("llama", dict(num_attention_heads=4, num_key_value_heads=2,
                                     tie_word_embeddings=True, rope_theta=100000.0)),
    "llama_mqa": ("llama", dict(num_attention_heads=4, num_key_value_heads=1)),
    "llama3_rope_scaling": ("llama", dict(
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "llama_attention_bias": ("llama", dict(num_attention_heads=4, num_key_value_heads=2,
                                           attention_bias=True)),
    "mistral": ("mistral", dict(num_attention_heads=4, num_key_value_heads=2,
                                sliding_window=None)),
    "qwen2_qkv_bias": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2,
                                     tie_word_embeddings=True)),
    "qwen3_qk_norm": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                    tie_word_embeddings=False)),
}


def _hf_model(kind, extra, seed=0):
    cfg_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[kind]
    cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
           "qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM}[kind]
    torch.manual_seed(seed)
    model = cls(cfg_cls(**BASE, **extra)).eval()
    with torch.no_grad():  # random norms and biases so their handling is exercised
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


# Cache, prefix, padding and dtype checks run on a subset; logits parity and export on all.
SUBSET = ["llama_gqa_tied", "qwen3_qk_norm", "llama3_rope_scaling"]


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_pair(request, tmp_path_factory):
    kind, extra = CASES[request.param]
    hf = _hf_model(kind, extra)
    folder = str(tmp_path_factory.mktemp(request.param))
    hf.save_pretrained(folder)
    config, params = weights.load_hf(folder)
    return hf, config, params


def test_logits_parity(hf_pair):
    hf, config, params = hf_pair
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, size=(2, 40))
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    positions = np.broadcast_to(np.arange(40), (2, 40))
    got, _ = model_lib.forward_jit(params, jnp.asarray(tokens), jnp.asarray(positions),
                               config=config)
    assert np.abs(np.asarray(got) - want).max() <= 1e-4


@pytest.mark.parametrize("hf_pair", SUBSET, indirect=True)
def test_decode_with_cache_equals_full_forward(hf_pair):
    _, config, params = hf_pair
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, size=(2, 24)))
    pos = jnp.broadcast_to(jnp.arange(24), (2, 24))
    full, _ = model_lib.forward_jit(params, tokens, pos, config=config)
    cache = model_lib.init_cache(config, 2, 32)
    first, cache = model_lib.forward_jit(params, tokens[:, :16], pos[:, :16], cache, config=config)
    steps = [first]
    for t in range(16, 24):
        out, cache = model_lib.forward_jit(params, tokens[:, t:t + 1], pos[:, t:t + 1], cache,
                                           config=config)
        steps.append(out)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4)
    assert int(cache["index"]) == 24


@pytest.mark.parametrize("hf_pair", SUBSET, indirect=True)
def test_prefix_of_own_kv_equals_concatenated_forward(hf_pair):
    _, config, params = hf_pair
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, size=(2, 30)))
    pos = jnp.broadcast_to(jnp.arange(30), (2, 30))
    full, _ = model_lib.forward_jit(params, tokens, pos, config=config)
    k, v = model_lib.prefill_kv(params, tokens[:, :18], pos[:, :18], config=config)
    prefix = {"k": k, "v": v, "mask": jnp.ones((2, 18), bool)}
    tail, _ = model_lib.forward_jit(params, tokens[:, 18:], pos[:, 18:], prefix=prefix,
                                config=config)
    np.testing.assert_allclose(tail, full[:, 18:], atol=1e-4)


@pytest.mark.parametrize("hf_pair", SUBSET[:1], indirect=True)
def test_llama_decoder_is_the_forward(hf_pair):
    """cas_jax's own decoder through the `decoder.Decoder` contract (what the trainers,
    scoring and the sampler call) gives `forward`'s numbers."""
    _, config, params = hf_pair
    dec = model_lib.as_decoder(config)
    assert isinstance(dec, decoder.Decoder) and model_lib.as_decoder(dec) is dec
    assert (dec.num_layers, dec.num_kv_heads, dec.head_dim, dec.vocab_size,
            dec.max_position_embeddings) == (config.num_layers, config.num_kv_heads,
                                             config.head_dim, config.vocab_size,
                                             config.max_position_embeddings)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, config.vocab_size, (2, 12)))
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    want, want_kv = model_lib.forward_jit(params, tokens, pos, config=config)

    @jax.jit
    def through_contract(params, tokens, pos):
        hidden, kv = dec.forward(params, tokens, pos)
        return dec.logits(params, hidden), kv

    got, got_kv = through_contract(params, tokens, pos)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    jax.tree.map(np.testing.assert_array_equal, got_kv, want_kv)


@pytest.mark.parametrize("hf_pair", SUBSET, indirect=True)
def test_unrolled_layers_match_the_stacked_scan(hf_pair):
    """The sampler's unrolled form (per-layer weights, cache and prefix; cache written before
    attention) gives the stacked scan's logits, for a prefill and then single-token steps."""
    _, config, params = hf_pair
    rng = np.random.default_rng(4)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, size=(2, 20)))
    ctx = jnp.asarray(rng.integers(0, config.vocab_size, size=(2, 6)))
    k, v = model_lib.prefill_kv(params, ctx, jnp.broadcast_to(jnp.arange(6), (2, 6)),
                                config=config)
    prefix = {"k": k, "v": v, "mask": jnp.asarray([[True] * 6, [True] * 4 + [False] * 2])}
    pos = jnp.asarray([np.arange(6, 26), np.concatenate([[-1, -1], np.arange(4, 22)])])
    unrolled = model_lib.unroll_layers(params)
    unrolled_prefix = model_lib.unroll_layers(prefix)
    # Without a cache: logits and the returned (stacked) new K/V agree.
    want, want_kv = model_lib.forward_jit(params, tokens, pos, None, prefix, config=config)
    got, got_kv = model_lib.forward_jit(unrolled, tokens, pos, None, unrolled_prefix,
                                        config=config)
    keep = np.asarray(pos) >= 0
    np.testing.assert_allclose(np.asarray(got)[keep], np.asarray(want)[keep], atol=1e-4)
    np.testing.assert_allclose(got_kv["k"], want_kv["k"], atol=1e-5)
    # With a cache: a 12-token prefill, then 8 single-token steps.
    stacked = model_lib.init_cache(config, 2, 32)
    cache = model_lib.unroll_layers(model_lib.init_cache(config, 2, 32))
    for a, b in [(0, 12)] + [(t, t + 1) for t in range(12, 20)]:
        want, stacked = model_lib.forward_jit(params, tokens[:, a:b], pos[:, a:b], stacked,
                                              prefix, config=config)
        got, cache = model_lib.forward_jit(unrolled, tokens[:, a:b], pos[:, a:b], cache,
                                           unrolled_prefix, config=config)
        keep = np.asarray(pos[:, a:b]) >= 0
        np.testing.assert_allclose(np.asarray(got)[keep], np.asarray(want)[keep], atol=1e-4)
    assert int(cache["index"]) == 20 and len(cache["k"]) == config.num_layers
    np.testing.assert_allclose(np.stack(cache["k"]), stacked["k"], atol=1e-5)
    np.testing.assert_array_equal(cache["pos"], stacked["pos"])
    with pytest.raises(ValueError, match="unrolled cache"):
        model_lib.forward(unrolled, tokens[:, :1], pos[:, :1], model_lib.init_cache(config, 2, 8),
                          config=config)


@pytest.mark.parametrize("hf_pair", SUBSET, indirect=True)
def test_shared_prefix_equals_the_prefix_copied_per_row(hf_pair):
    """A prefix with batch 1 is read by every row, as if it were copied into each."""
    _, config, params = hf_pair
    rng = np.random.default_rng(3)
    ctx = jnp.asarray(rng.integers(0, config.vocab_size, size=(1, 12)))
    k, v = model_lib.prefill_kv(params, ctx, jnp.arange(12)[None], config=config)
    mask = jnp.asarray([[True] * 10 + [False] * 2])
    shared = {"k": k, "v": v, "mask": mask}
    copied = {"k": jnp.repeat(k, 3, axis=1), "v": jnp.repeat(v, 3, axis=1),
              "mask": jnp.repeat(mask, 3, axis=0)}
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, size=(3, 7)))
    pos = jnp.asarray([[10 + i if i >= j else -1 for i in range(7)] for j in (0, 2, 4)])
    a, _ = model_lib.forward_jit(params, tokens, pos, prefix=shared, config=config)
    b, _ = model_lib.forward_jit(params, tokens, pos, prefix=copied, config=config)
    keep = np.asarray(pos) >= 0
    np.testing.assert_allclose(np.asarray(a)[keep], np.asarray(b)[keep], atol=1e-5)


@pytest.mark.parametrize("hf_pair", SUBSET, indirect=True)
def test_padding_tokens_do_not_change_real_tokens(hf_pair):
    _, config, params = hf_pair
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, size=(1, 12)))
    pos = jnp.arange(12)[None]
    ref, _ = model_lib.forward_jit(params, tokens, pos, config=config)
    padded = jnp.concatenate([jnp.zeros((1, 5), jnp.int32), tokens], axis=1)
    ppos = jnp.concatenate([jnp.full((1, 5), -1), pos], axis=1)
    out, _ = model_lib.forward_jit(params, padded, ppos, config=config)
    np.testing.assert_allclose(out[:, 5:], ref, atol=1e-5)


@pytest.mark.parametrize("hf_pair", SUBSET, indirect=True)
def test_bf16_forward_close_to_f32(hf_pair):
    _, config, params = hf_pair
    tokens = jnp.arange(16)[None] % config.vocab_size
    pos = jnp.arange(16)[None]
    ref, _ = model_lib.forward_jit(params, tokens, pos, config=config)
    p16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    out, _ = model_lib.forward_jit(p16, tokens, pos, config=config)
    assert out.dtype == jnp.float32
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() < 0.1 * np.abs(ref).max() + 0.05


def test_export_roundtrip(hf_pair, tmp_path):
    _, config, params = hf_pair
    weights.save_hf(str(tmp_path), config, params)
    config2, params2 = weights.load_hf(str(tmp_path))
    assert config2 == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)
