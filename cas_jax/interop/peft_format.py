"""Hugging Face PEFT's CARTRIDGE adapter (peft 0.21.2, `PeftType.CARTRIDGE`): a folder that
`peft.PeftModel.from_pretrained(model, folder)` loads onto the transformers model.

  adapter_model.safetensors   prompt_embeddings [P, L * 2 * K * Dh]: token t's row holds, layer
                              by layer, its key then its value, each [K, Dh] flattened
  adapter_config.json         peft_type "CARTRIDGE", task_type "CAUSAL_LM", num_virtual_tokens P,
                              num_frozen_tokens, num_layers L, num_attention_heads K (the kv
                              heads, as PEFT sets them for grouped-query models), token_dim
                              K * Dh, num_transformer_submodules 1, inference_mode true

PEFT hands the rows to the model as `past_key_values` before the input (`PeftModel.get_prompt`,
cast to the model's dtype): keys after RoPE at positions 0..P-1, and the input's positions start
at P. Those are cas_jax's semantics, so the conversion is a reshape, bitwise both ways.

Limits of peft 0.21.2 on transformers 5.x: `PeftModel.generate` does not see the cartridge (it
decodes as the base model does: generate passes its own `cache`, which transformers prefers to
the `past_key_values` PEFT injects), while the forward `PeftModel(input_ids=...)` does. To
decode, run the forward on the prompt with use_cache=True and continue from its cache with the
base model (`out = peft_model.base_model(input_ids=next_token, cache=out.cache)`), or run the
forward on the whole sequence at each step. PEFT's `compose_cartridge_adapters` concatenates
adapters whole, keeping every sink; export several ids at once (`interop.compose_one_sink`) to
keep one, as cas_jax's composition does.
"""

from __future__ import annotations

import json
import os

import numpy as np

from cas_jax.cartridges.cartridge import Cartridge, CartridgeMeta
from cas_jax.interop.common import (CartridgeFormatError, check_floating, check_model_shape,
                                    check_num_frozen, kv_arrays, load_safetensors, save_safetensors,
                                    write_atomically)

WEIGHTS_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"
EMBEDDINGS = "prompt_embeddings"
_INT_FIELDS = ("num_virtual_tokens", "num_frozen_tokens", "num_layers", "num_attention_heads",
               "token_dim")


def save_peft_cartridge(cartridge: Cartridge, directory: str) -> None:
    """Writes `cartridge` as a PEFT CARTRIDGE adapter folder (created if absent), dtype kept;
    num_frozen_tokens = meta.num_frozen."""
    keys, values = kv_arrays(cartridge)
    layers, p, heads, head_dim = keys.shape
    rows = np.stack([keys, values], axis=1).transpose(2, 0, 1, 3, 4)  # [P, L, 2, K, Dh]
    config = {"peft_type": "CARTRIDGE", "task_type": "CAUSAL_LM", "num_virtual_tokens": p,
              "num_frozen_tokens": cartridge.meta.num_frozen, "num_layers": layers,
              "num_attention_heads": heads, "token_dim": heads * head_dim,
              "num_transformer_submodules": 1, "inference_mode": True}
    os.makedirs(directory, exist_ok=True)
    save_safetensors(os.path.join(directory, WEIGHTS_FILE),
                     {EMBEDDINGS: rows.reshape(p, layers * 2 * heads * head_dim)},
                     {"format": "pt"})

    def write_config(tmp):
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)

    write_atomically(os.path.join(directory, CONFIG_FILE), write_config)


def _read_config(path: str) -> dict:
    """The adapter config's CARTRIDGE fields, checked."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (expected a PEFT adapter_config.json)")
    try:
        with open(path) as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CartridgeFormatError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(config, dict) or config.get("peft_type") != "CARTRIDGE":
        got = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise CartridgeFormatError(f"{path}: peft_type {got!r}, expected 'CARTRIDGE' (a PEFT "
                                   f"CARTRIDGE adapter)")
    for name in _INT_FIELDS:
        value = config.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CartridgeFormatError(f"{path}: {name} is {value!r}, expected a non-negative "
                                       f"integer")
    if config.get("num_transformer_submodules", 1) != 1:
        raise CartridgeFormatError(f"{path}: num_transformer_submodules "
                                   f"{config['num_transformer_submodules']!r}, expected 1 (a "
                                   f"decoder-only model)")
    heads, token_dim = config["num_attention_heads"], config["token_dim"]
    if heads == 0 or token_dim % heads:
        raise CartridgeFormatError(f"{path}: token_dim {token_dim} is not a multiple of "
                                   f"num_attention_heads {heads}; expected kv_heads x head_dim")
    return config


def load_peft_cartridge(directory: str, *, model_fingerprint: str, doc_id: str = "",
                        expected_shape: tuple[int, int, int] | None = None) -> Cartridge:
    """Reads a PEFT CARTRIDGE adapter folder into a Cartridge of host arrays [L, P, K, Dh],
    dtype as stored, num_frozen = num_frozen_tokens, init "peft".

    Raises FileNotFoundError, CartridgeFormatError (not a CARTRIDGE adapter, unreadable or
    missing weights, shape other than the config's) or CartridgeMismatchError (the model's
    shape differs).
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such PEFT adapter folder (expected "
                                f"{CONFIG_FILE} and {WEIGHTS_FILE} in it)")
    config = _read_config(os.path.join(directory, CONFIG_FILE))
    p, layers = config["num_virtual_tokens"], config["num_layers"]
    heads, token_dim = config["num_attention_heads"], config["token_dim"]
    head_dim = token_dim // heads
    path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.exists(path) and os.path.exists(os.path.join(directory, "adapter_model.bin")):
        raise CartridgeFormatError(f"{directory}: holds adapter_model.bin only; cas_jax reads "
                                   f"{WEIGHTS_FILE} (save with safe_serialization=True)")
    want = (p, layers * 2 * token_dim)
    tensors, _ = load_safetensors(path, f"{EMBEDDINGS} [{want[0]}, {want[1]}]")
    if EMBEDDINGS not in tensors:
        raise CartridgeFormatError(f"{path}: no {EMBEDDINGS} tensor (it has "
                                   f"{sorted(tensors)}), expected {EMBEDDINGS} {list(want)}")
    rows = tensors[EMBEDDINGS]
    check_floating(path, EMBEDDINGS, rows)
    if rows.shape != want:
        raise CartridgeFormatError(
            f"{path}: {EMBEDDINGS} has shape {list(rows.shape)}, expected {list(want)} "
            f"(num_virtual_tokens, num_layers x 2 x token_dim of {CONFIG_FILE})")
    check_num_frozen(os.path.join(directory, CONFIG_FILE), config["num_frozen_tokens"], p)
    check_model_shape(directory, layers, heads, head_dim, expected_shape)
    rows = rows.reshape(p, layers, 2, heads, head_dim)
    keys = np.ascontiguousarray(rows[:, :, 0].transpose(1, 0, 2, 3))
    values = np.ascontiguousarray(rows[:, :, 1].transpose(1, 0, 2, 3))
    return Cartridge(keys=keys, values=values, meta=CartridgeMeta(
        model_fingerprint, doc_id, config["num_frozen_tokens"], "peft"))
