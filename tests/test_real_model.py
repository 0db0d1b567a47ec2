"""The embedded SmolLM2-135M-Instruct GGUF: parity with transformers, generation, bad files."""

import os

import numpy as np
import pytest
import jax.numpy as jnp

from cas_jax.model import config as config_lib, sampling, tokenizer as tok_lib, weights
from cas_jax.model.llama import forward_jit
from cas_jax.model.loading import default_model_path, load_model

pytestmark = pytest.mark.slow  # the real 135M model


def test_default_model_config(smollm):
    c = smollm.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
            c.vocab_size, c.rope_theta, c.tie_embeddings) == (
        30, 576, 9, 3, 64, 49152, 100000.0, True)
    assert "<|im_start|>" in smollm.tokenizer.chat_template


def test_gguf_logits_match_transformers(smollm):
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                              gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    ids = tok_lib.encode_chat(smollm.tokenizer, [
        {"role": "user", "content": "Describe the climate of Norway in one sentence."}])
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits.numpy()
    pos = jnp.arange(len(ids))[None]
    got, _ = forward_jit(smollm.params, jnp.asarray([ids]), pos, config=smollm.config)
    assert np.abs(np.asarray(got) - want).max() < 2e-3
    assert (np.asarray(got).argmax(-1) == want.argmax(-1)).mean() == 1.0


def test_greedy_answers_paris(smollm):
    tok = smollm.tokenizer
    prompts = [tok_lib.encode_chat(tok, [{"role": "user", "content": q}]) for q in
               ["What is the capital of France?", "Say hello."]]
    sp = sampling.SamplingParams(max_new_tokens=24, stop_ids=tuple(tok_lib.stop_token_ids(tok)))
    outs = sampling.generate(smollm.params, smollm.config, prompts, sp)
    assert "Paris" in tok.decode(outs[0])
    # Per-row lengths: batching with a longer/shorter neighbour does not change the answer.
    alone = sampling.generate(smollm.params, smollm.config, prompts[:1], sp)
    assert alone[0] == outs[0]


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        weights.load_hf(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nothere.gguf"):
        load_model(str(tmp_path / "nothere.gguf"))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "vocab_size": 10}')
    with pytest.raises(config_lib.UnsupportedConfigError, match="model_type"):
        weights.load_hf(str(tmp_path))
    bad = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
           "num_hidden_layers": 1, "num_attention_heads": 2, "hidden_act": "gelu"}
    with pytest.raises(config_lib.UnsupportedConfigError, match="hidden_act"):
        config_lib.from_hf_dict(bad)
    bad = dict(bad, hidden_act="silu", some_new_feature=True)
    with pytest.raises(config_lib.UnsupportedConfigError, match="some_new_feature"):
        config_lib.from_hf_dict(bad)
    bad = dict(bad, some_new_feature=None)
    del bad["some_new_feature"]
    bad["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(config_lib.UnsupportedConfigError, match="yarn"):
        config_lib.from_hf_dict(bad)


def test_truncated_safetensors_named(tmp_path):
    import jax

    from cas_jax.model import llama as model_lib

    cfg = config_lib.ModelConfig(model_type="llama", vocab_size=32, hidden_size=16,
                                 intermediate_size=32, num_layers=1, num_heads=2,
                                 num_kv_heads=1, head_dim=8)
    params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
    weights.save_hf(str(tmp_path), cfg, params)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(weights.WeightsError, match="model.safetensors.*truncated"):
        weights.load_hf(str(tmp_path))


def test_truncated_gguf_named(tmp_path):
    src = default_model_path()
    bad = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(5_000_000))
    with pytest.raises(weights.WeightsError, match="cut.gguf"):
        weights.load_gguf(str(bad))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(weights.WeightsError, match="garbage.gguf"):
        weights.load_gguf(str(garbage))


@pytest.mark.slow
def test_cartridge_of_the_documents_own_kv_equals_icl(smollm):
    """The one rendering puts a cartridge exactly where ICL's document block stands: a cartridge
    initialised from the whole block (first-P init with P = its length) scores like ICL."""
    from cas_jax.cartridges.cartridge import init_from_tokens
    from cas_jax.documents import corpus
    from cas_jax.evaluation import evaluate, questions
    from cas_jax.model import rendering
    from cas_jax.training import train_collection

    docs = corpus.load_factbook_sections(documents=["fr-transportation"])
    qs = questions.generate_factbook_questions(["fr-transportation"], 3, seed=0)
    assert qs and all(q.doc_id == "fr-transportation" for q in qs)
    ev = evaluate.Evaluator(smollm, docs, evaluate.EvalConfig(max_new_tokens=0))
    icl = ev.icl(qs)
    text = docs["fr-transportation"].text
    n = len(rendering.rendering_for(smollm.tokenizer).document(text))
    ids = train_collection.document_tokens(smollm.tokenizer, text, n)
    cart = init_from_tokens(smollm.config, smollm.params, ids, fingerprint=smollm.fingerprint,
                            doc_id="fr-transportation")
    oracle = ev.oracle_cartridge(qs, {"fr-transportation": cart})
    assert oracle.cartridge_tokens == icl.context_tokens == n
    for a, b in zip(oracle.records, icl.records):
        np.testing.assert_allclose(a["option_logprobs"], b["option_logprobs"], atol=2e-3, rtol=1e-4)
