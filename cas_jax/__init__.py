"""cas_jax: Cartridges and Cartridges at Scale in JAX.

The small public API (everything else lives in the submodules named after what they do):

    import cas_jax
    m = cas_jax.load_model()                      # embedded SmolLM2-135M-Instruct, or a path
    logits, kv = cas_jax.forward(m.params, tokens, positions, config=m.config)
    outs = cas_jax.generate(m.params, m.config, [ids], cas_jax.SamplingParams(max_new_tokens=32))

Wherever a model `config` is taken, any `cas_jax.Decoder` (your own JAX decoder) may stand in
for the ModelConfig of cas_jax's own (see `cas_jax.decoder`).
"""

from cas_jax.attention import (CartridgeBank, Geometry, bank_from_cartridges, compose,
                               num_prefix_tokens)
from cas_jax.cartridge import Cartridge, CartridgeMeta
from cas_jax.config import ModelConfig
from cas_jax.decoder import Decoder
from cas_jax.loading import LoadedModel, default_model_path, load_model
from cas_jax.model import LlamaDecoder, forward, forward_jit, init_cache, prefill_kv
from cas_jax.sampling import SamplingParams, generate
from cas_jax.tokenizer import encode_chat, load_tokenizer, stop_token_ids

__all__ = [
    "CartridgeBank", "Geometry", "bank_from_cartridges", "compose", "num_prefix_tokens",
    "Cartridge",
    "CartridgeMeta", "ModelConfig", "Decoder", "LlamaDecoder", "LoadedModel", "default_model_path", "load_model", "forward",
    "forward_jit", "init_cache", "prefill_kv", "SamplingParams", "generate", "encode_chat",
    "load_tokenizer", "stop_token_ids",
]
