"""cas_jax: Cartridges and Cartridges at Scale in JAX.

The small public API, stable whatever moves behind it:

    import cas_jax
    m = cas_jax.load_model()                      # embedded SmolLM2-135M-Instruct, or a path
    logits, kv = cas_jax.forward(m.params, tokens, positions, config=m.config)
    outs = cas_jax.generate(m.params, m.config, [ids], cas_jax.SamplingParams(max_new_tokens=32))

Wherever a model `config` is taken, any `cas_jax.Decoder` (your own JAX decoder) may stand in
for the ModelConfig of cas_jax's own (see `cas_jax.model.decoder`).

Everything else lives in the subpackages, one per concern (each one's docstring says what it
holds and what it may import; tests/test_layers.py checks it):

    model        config, the `Decoder` contract, the Llama-family decoder, weights, tokenizer,
                 loading, sampling, rendering
    documents    document collections and chunking
    cartridges   the cartridge pytree, composition, files, store, budget manager, KV init
    training     self-study data, losses, the single and collection trainers, hooks
    evaluation   questions, prompts, scoring, retrieval, results, evaluate
    interop      other projects' cartridge files (reference, Tokasaurus, PEFT, vLLM)
    serving      the OpenAI-compatible server and its engines
    studies      the quality and CAS studies, composition, the pipeline, splits
    (top level)  progress, config_flags, distributed: utilities that import nothing of cas_jax
"""

from cas_jax.cartridges.attention import (CartridgeBank, Geometry, bank_from_cartridges, compose,
                                          num_prefix_tokens)
from cas_jax.cartridges.cartridge import Cartridge, CartridgeMeta
from cas_jax.model.config import ModelConfig
from cas_jax.model.decoder import CompressibleKV, Decoder
from cas_jax.model.llama import LlamaDecoder, forward, forward_jit, init_cache, prefill_kv
from cas_jax.model.loading import LoadedModel, default_model_path, load_model
from cas_jax.model.sampling import SamplingParams, generate
from cas_jax.model.tokenizer import encode_chat, load_tokenizer, stop_token_ids

__all__ = [
    "CartridgeBank", "Geometry", "bank_from_cartridges", "compose", "num_prefix_tokens",
    "Cartridge",
    "CartridgeMeta", "ModelConfig", "Decoder", "CompressibleKV", "LlamaDecoder", "LoadedModel", "default_model_path", "load_model", "forward",
    "forward_jit", "init_cache", "prefill_kv", "SamplingParams", "generate", "encode_chat",
    "load_tokenizer", "stop_token_ids",
]
