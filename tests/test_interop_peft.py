"""cas_jax cartridges in Hugging Face PEFT (the real `peft` package, its CARTRIDGE adapter) on the
transformers model with the same weights: same logits as cas_jax, files PEFT writes read back
bitwise, bf16 and composed exports, and the documented `generate` limit and its workaround."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
import transformers  # noqa: E402

from cas_jax.cartridges import attention, cartridge as cart_lib  # noqa: E402
from cas_jax.cartridges.cartridge import CartridgeMeta  # noqa: E402
from cas_jax.interop import convert as interop
from cas_jax.model import weights
from cas_jax.model import llama as model_lib  # noqa: E402
from conftest import cartridge_prefix  # noqa: E402

FP = "tiny-hf"
T = 9  # input tokens after the cartridge


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers model, cas_jax config, cas_jax params) with the same weights (GQA)."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=10000.0)).eval()
    with torch.no_grad():  # non-trivial norms, as in tests/test_model.py
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    folder = str(tmp_path_factory.mktemp("hf"))
    hf.save_pretrained(folder)
    config, params = weights.load_hf(folder)
    return hf, config, params


def trained_like(config, params, p, seed, doc_id="doc"):
    """A cartridge as training leaves it: the K/V of p tokens, then moved off them."""
    rng = np.random.default_rng(seed)
    c = jax.device_get(cart_lib.init_from_tokens(
        config, params, rng.integers(0, config.vocab_size, p), fingerprint=FP, doc_id=doc_id))
    noise = lambda a: (a + 0.5 * rng.standard_normal(a.shape)).astype(np.float32)  # noqa: E731
    return c.replace(keys=noise(np.asarray(c.keys)), values=noise(np.asarray(c.values)))


def cas_logits(config, params, prefix, tokens):
    start = int(attention.num_prefix_tokens(prefix, 1)[0])
    positions = start + jnp.arange(tokens.shape[1])[None]
    logits, _ = model_lib.forward(params, jnp.asarray(tokens), positions, prefix=prefix,
                                  config=config)
    return np.asarray(logits)


def peft_model(hf, adapter):
    m = peft.PeftModel.from_pretrained(hf, adapter)
    assert m.peft_config["default"].peft_type == peft.PeftType.CARTRIDGE
    return m


def peft_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.tensor(np.asarray(tokens))).logits.numpy()


@pytest.mark.parametrize("num_frozen", [1, 0])
def test_peft_adapter_gives_cas_jax_logits_and_imports_back_bitwise(models, tmp_path,
                                                                   num_frozen):
    hf, config, params = models
    c = trained_like(config, params, 6, seed=1)
    c = c.replace(meta=CartridgeMeta(FP, "doc", num_frozen))
    adapter = str(tmp_path / "adapter")
    interop.save(c, adapter, "peft")
    m = peft_model(hf, adapter)
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (1, T))
    want = cas_logits(config, params, cartridge_prefix(c), tokens)
    got = peft_logits(m, tokens)
    assert np.abs(got - want).max() <= 1e-3
    assert np.abs(peft_logits(hf, tokens) - want).max() > 0.1  # the cartridge matters

    shape = interop.kv_shape(config)
    back = interop.load(adapter, "peft", model_fingerprint=FP, expected_shape=shape)
    assert back.keys.tobytes() == c.keys.tobytes() and back.values.tobytes() == c.values.tobytes()
    assert back.meta.num_frozen == num_frozen
    # What PEFT itself saves from the loaded adapter reads back bitwise too.
    resaved = str(tmp_path / "resaved")
    m.save_pretrained(resaved)
    again = interop.load(resaved, "peft", model_fingerprint=FP, expected_shape=shape)
    assert again.keys.tobytes() == c.keys.tobytes()
    assert again.values.tobytes() == c.values.tobytes()
    assert again.meta.num_frozen == num_frozen


def test_peft_loads_a_bf16_export(models, tmp_path):
    hf, config, params = models
    c = trained_like(config, params, 5, seed=3)
    adapter = str(tmp_path / "adapter")
    interop.save(interop.cast(c, "bf16"), adapter, "peft")
    rounded = interop.cast(interop.cast(c, "bf16"), "f32")
    tokens = np.random.default_rng(4).integers(0, config.vocab_size, (1, T))
    want = cas_logits(config, params, cartridge_prefix(rounded), tokens)
    assert np.abs(peft_logits(peft_model(hf, adapter), tokens) - want).max() <= 1e-3
    back = interop.load(adapter, "peft", model_fingerprint=FP)
    assert back.keys.dtype == ml_dtypes.bfloat16


def test_a_composed_export_gives_cas_jax_composition_logits(models, tmp_path):
    hf, config, params = models
    parts = [trained_like(config, params, p, seed=10 + i, doc_id=d)
             for i, (p, d) in enumerate([(5, "a"), (4, "b"), (6, "c")])]
    adapter = str(tmp_path / "adapter")
    interop.save(interop.compose_one_sink(parts), adapter, "peft")
    tokens = np.random.default_rng(5).integers(0, config.vocab_size, (1, T))
    want = cas_logits(config, params, attention.compose_in_order(parts), tokens)
    assert np.abs(peft_logits(peft_model(hf, adapter), tokens) - want).max() <= 1e-3


def _cas_greedy(config, params, prefix, prompt, n):
    seq = np.asarray(prompt)
    for _ in range(n):
        nxt = cas_logits(config, params, prefix, seq)[:, -1].argmax(-1)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    return seq[0, prompt.shape[1]:].tolist()


def test_generate_limit_and_the_documented_workaround(models, tmp_path):
    """peft 0.21.2 on transformers 5.x: PeftModel.generate decodes as if there were no cartridge;
    the forward on the prompt with use_cache, continued by the base model from that cache,
    decodes what cas_jax decodes."""
    hf, config, params = models
    c = trained_like(config, params, 6, seed=6)
    adapter = str(tmp_path / "adapter")
    interop.save(c, adapter, "peft")
    m = peft_model(hf, adapter)
    prompt = np.random.default_rng(7).integers(0, config.vocab_size, (1, T))
    n = 6
    want = _cas_greedy(config, params, cartridge_prefix(c), prompt, n)
    assert want != _cas_greedy(config, params, None, prompt, n)  # the cartridge changes it

    ids = torch.tensor(prompt)
    with torch.no_grad():
        out = m(input_ids=ids, use_cache=True)  # the workaround (README, interop_peft)
        cache, got = out.cache, []
        for _ in range(n):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            got.append(int(nxt))
            out = m.base_model(input_ids=nxt, cache=cache, use_cache=True)
            cache = out.cache
        generated = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                               max_new_tokens=n, do_sample=False)[0, T:].tolist()
    assert got == want
    assert generated != want, ("PeftModel.generate now sees the cartridge: drop the limit "
                               "documented in cas_jax/interop/peft_format.py and the README")
