"""A learned prefix in the per-layer layout of the vLLM fork that serves one prefix per request
(released vLLM has no cartridge support): one safetensors file of

  layers.{l}.attention.prefix.keys     [1, P, K, Dh]
  layers.{l}.attention.prefix.values   [1, P, K, Dh]

for l = 0..L-1, keys after RoPE at positions 0..P-1, the request's positions starting at P.
safetensors is the container: named tensors, no pickled code, read by
`safetensors.torch.load_file` into exactly these names. Its metadata holds
{"format": "pt", "num_frozen_tokens": "<f>"}; only cas_jax reads the latter (1 when absent).
"""

from __future__ import annotations

import re

import numpy as np

from cas_jax.cartridges.cartridge import Cartridge, CartridgeMeta
from cas_jax.interop.common import (CartridgeFormatError, check_floating, check_model_shape,
                                    check_num_frozen, kv_arrays, load_safetensors, save_safetensors)

_NAME = "layers.{}.attention.prefix.{}"
_NAME_RE = re.compile(r"^layers\.(\d+)\.attention\.prefix\.(keys|values)$")
_DESCRIPTION = "tensors layers.{l}.attention.prefix.keys/values [1, P, kv_heads, head_dim]"


def save_vllm_prefix(cartridge: Cartridge, path: str) -> None:
    """Writes `cartridge` as the per-layer prefix file at `path`, dtype kept."""
    keys, values = kv_arrays(cartridge)
    tensors = {}
    for layer in range(keys.shape[0]):
        tensors[_NAME.format(layer, "keys")] = keys[layer][None]
        tensors[_NAME.format(layer, "values")] = values[layer][None]
    save_safetensors(path, tensors, {"format": "pt",
                                     "num_frozen_tokens": str(cartridge.meta.num_frozen)})


def load_vllm_prefix(path: str, *, model_fingerprint: str, doc_id: str = "",
                     expected_shape: tuple[int, int, int] | None = None) -> Cartridge:
    """Reads a per-layer prefix file into a Cartridge of host arrays [L, P, K, Dh], dtype as
    stored, init "vllm_prefix", num_frozen from the metadata (1 when absent).

    Raises FileNotFoundError, CartridgeFormatError (unreadable, missing, unexpected or
    inconsistent tensors) or CartridgeMismatchError (the model's shape differs).
    """
    tensors, metadata = load_safetensors(path, _DESCRIPTION)
    unexpected = sorted(k for k in tensors if not _NAME_RE.match(k))
    if unexpected:
        raise CartridgeFormatError(f"{path}: unexpected tensors {unexpected[:4]}, expected "
                                   f"only {_DESCRIPTION}")
    if not tensors:
        raise CartridgeFormatError(f"{path}: no tensors, expected {_DESCRIPTION}")
    layers = 1 + max(int(_NAME_RE.match(k).group(1)) for k in tensors)
    names = [_NAME.format(layer, kind) for layer in range(layers) for kind in ("keys", "values")]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise CartridgeFormatError(f"{path}: missing tensors {missing[:4]}, expected "
                                   f"{_DESCRIPTION} for every layer 0..{layers - 1}")
    first = tensors[names[0]]
    for name in names:
        t = tensors[name]
        check_floating(path, name, t)
        if t.ndim != 4 or t.shape[0] != 1 or t.shape != first.shape or t.dtype != first.dtype:
            raise CartridgeFormatError(
                f"{path}: {name} is {t.dtype}{list(t.shape)}, {names[0]} is "
                f"{first.dtype}{list(first.shape)}; expected every layer's keys and values "
                f"alike, [1, P, kv_heads, head_dim]")
    _, p, heads, head_dim = first.shape
    try:
        num_frozen = int(metadata.get("num_frozen_tokens", "1"))
    except ValueError:
        raise CartridgeFormatError(f"{path}: metadata num_frozen_tokens "
                                   f"{metadata['num_frozen_tokens']!r}, expected an integer")
    check_num_frozen(path, num_frozen, p)
    check_model_shape(path, layers, heads, head_dim, expected_shape)
    keys = np.stack([tensors[_NAME.format(layer, "keys")][0] for layer in range(layers)])
    values = np.stack([tensors[_NAME.format(layer, "values")][0] for layer in range(layers)])
    return Cartridge(keys=keys, values=values,
                     meta=CartridgeMeta(model_fingerprint, doc_id, num_frozen, "vllm_prefix"))
