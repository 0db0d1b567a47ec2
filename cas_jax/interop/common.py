"""What the interchange formats (`cas_jax.interop`) share: their error, bit-exact torch <->
numpy conversion, safetensors reading, atomic writes, and the checks of a file's K/V against a
model.

cas_jax keeps a cartridge's keys/values as [layers, tokens, kv_heads, head_dim] with keys after
RoPE, token t rotated with position t (`cartridge.Cartridge`); every format stores the same
numbers in its own layout, so conversions are transposes and reshapes, never arithmetic.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import ml_dtypes
import numpy as np

from cas_jax.cartridges.cartridge import Cartridge, CartridgeMismatchError

class CartridgeFormatError(ValueError):
    """A file is not a readable cartridge of its format; the message names the file and what
    was expected."""


def torch_module():
    """torch, imported on first use: only the .pt formats need it (`pip install torch`)."""
    try:
        import torch
    except ImportError:
        raise ImportError("reading or writing reference or Tokasaurus (PyTorch) cartridges "
                          "needs torch: pip install torch") from None
    return torch


def to_torch(a: np.ndarray):
    """A torch tensor owning a copy of `a`'s bits (bfloat16 through an int16 view)."""
    torch = torch_module()
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.array(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def to_numpy(t) -> np.ndarray:
    """The bits of torch tensor `t` as numpy (bfloat16 as `ml_dtypes.bfloat16`)."""
    torch = torch_module()
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def kv_arrays(cartridge: Cartridge) -> tuple[np.ndarray, np.ndarray]:
    """The cartridge's keys/values as host arrays [L, P, K, Dh], checked for writing."""
    keys, values = np.asarray(cartridge.keys), np.asarray(cartridge.values)
    if keys.ndim != 4 or keys.shape != values.shape or keys.dtype != values.dtype:
        raise ValueError(f"cartridge {cartridge.meta.doc_id!r}: keys/values shaped "
                         f"{keys.shape}/{values.shape} ({keys.dtype}/{values.dtype}), expected "
                         f"equal [layers, tokens, kv_heads, head_dim]")
    return keys, values


def check_floating(path: str, name: str, a: np.ndarray) -> None:
    if a.dtype not in (np.float32, np.float16, ml_dtypes.bfloat16):
        raise CartridgeFormatError(f"{path}: {name} is {a.dtype}, expected float32, bfloat16 "
                                   f"or float16")


def check_model_shape(path: str, layers: int, heads: int, head_dim: int,
                      expected_shape: tuple[int, int, int] | None) -> None:
    """CartridgeMismatchError naming `path` unless (layers, heads, head_dim) is the model's
    (num_layers, num_kv_heads, head_dim); None skips the check."""
    if expected_shape is not None and (layers, heads, head_dim) != tuple(expected_shape):
        want_l, want_k, want_d = expected_shape
        raise CartridgeMismatchError(
            f"{path}: a cartridge for {layers} layers x {heads} kv heads x head_dim {head_dim}, "
            f"expected the model's {want_l} layers x {want_k} kv heads x head_dim {want_d}")


def check_num_frozen(path: str, num_frozen: int, num_tokens: int) -> None:
    if not 0 <= num_frozen < num_tokens:
        raise CartridgeFormatError(f"{path}: {num_frozen} frozen of {num_tokens} tokens, "
                                   f"expected 0 <= frozen < tokens (at least one trainable)")


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """Calls write(tmp) next to `path`, then renames tmp into place: no torn file on a crash."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]
                     ) -> None:
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_safetensors(path: str, what: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors as numpy, bfloat16 as ml_dtypes; metadata) of a safetensors file holding `what`.

    FileNotFoundError or CartridgeFormatError (unreadable, truncated, unsupported dtype)
    naming `path`."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (expected {what})")
    try:
        with safe_open(path, framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # SafetensorError, KeyError (dtype), OSError, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CartridgeFormatError(f"{path}: not a readable safetensors file ({reason}); "
                                   f"expected {what}") from e
