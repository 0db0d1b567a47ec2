"""Interchange with the PyTorch reference implementation of Cartridges (HazyResearch/cartridges).

The reference file (`TrainableCache.save`, the `cartridge.pt` that Tokasaurus serves) is a
`torch.save` of a dict of four per-layer lists, one tensor per layer:
  frozen_keys, frozen_values         [1, kv_heads, num_frozen, head_dim]   the first tokens
  trainable_keys, trainable_values   [1, kv_heads, num_tokens - num_frozen, head_dim]
Keys are stored after RoPE with token t at position t, as in cas_jax, so a conversion is only a
transpose: cas_jax keeps keys/values [layers, tokens, kv_heads, head_dim] (`cartridge.Cartridge`).
With no frozen tokens the frozen lists are empty. The file carries no model identity: the loader
stamps the fingerprint it is given and can check the shape against a model.

Dtypes are kept bit for bit (bfloat16 crosses numpy as `ml_dtypes.bfloat16` via an int16 view).
The reference saves `nn.ParameterList`s; `torch.load(weights_only=True)` reads them (the class is
allowed for that call only) as well as the plain lists of tensors written here. Tokasaurus uses
the trainable tokens truncated to a multiple of its page size (16), so a cartridge whose
trainable token count is such a multiple is served whole.

torch is imported lazily: it is only needed here (`pip install torch`).

Launcher-level helpers (`export_cartridge`, `import_cartridge`) read from and write to cas_jax
cartridge stores; a `store` argument there is a CartridgeStore root (it holds STORE.json) or the
--store folder of `experiments.train_collection` (whose store is its `cartridges/` folder).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_dtypes
import numpy as np
import optax

from cas_jax import store as store_lib, train
from cas_jax.cartridge import Cartridge, CartridgeMeta, CartridgeMismatchError, check_compatible
from cas_jax.config import ModelConfig
from cas_jax.train_collection import single_parts

FROZEN_KEYS, FROZEN_VALUES = "frozen_keys", "frozen_values"
TRAINABLE_KEYS, TRAINABLE_VALUES = "trainable_keys", "trainable_values"
REFERENCE_KEYS = (TRAINABLE_KEYS, TRAINABLE_VALUES, FROZEN_KEYS, FROZEN_VALUES)
IMPORTED_INIT = "reference"  # CartridgeMeta.init of an imported cartridge (the file has none)


class ReferenceFormatError(ValueError):
    """A file is not a readable reference cartridge; the message names the file."""


def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError("reading or writing reference (PyTorch) cartridges needs torch: "
                          "pip install torch") from None
    return torch


def kv_shape(config: ModelConfig) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim): what a cartridge's shape must match for `config`."""
    return config.num_layers, config.num_kv_heads, config.head_dim


# ----------------------------------------------------------------------------- tensors


def _to_torch(a: np.ndarray):
    """A torch tensor owning a copy of `a`'s bits (bfloat16 through an int16 view)."""
    torch = _torch()
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.array(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def _to_numpy(t) -> np.ndarray:
    """The bits of torch tensor `t` as numpy (bfloat16 as `ml_dtypes.bfloat16`)."""
    torch = _torch()
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _reference_layers(a: np.ndarray, start: int, stop: int | None) -> list:
    """Tokens [start:stop] of a [L, P, K, Dh] array as L tensors [1, K, tokens, Dh]."""
    return [_to_torch(layer[start:stop].transpose(1, 0, 2)[None]) for layer in a]


def save_reference_cartridge(cartridge: Cartridge, path: str) -> None:
    """Writes `cartridge` (keys/values [L, P, K, Dh]) as a reference `cartridge.pt` at `path`:
    its first `meta.num_frozen` tokens as frozen_*, the rest as trainable_*, dtype unchanged.

    The file is written next to `path` and renamed into place, so a crash leaves no torn file.
    """
    torch = _torch()
    keys, values = np.asarray(cartridge.keys), np.asarray(cartridge.values)
    if keys.ndim != 4 or keys.shape != values.shape or keys.dtype != values.dtype:
        raise ValueError(f"cartridge {cartridge.meta.doc_id!r}: keys/values shaped "
                         f"{keys.shape}/{values.shape} ({keys.dtype}/{values.dtype}), expected "
                         f"equal [layers, tokens, kv_heads, head_dim]")
    f = cartridge.meta.num_frozen
    data = {FROZEN_KEYS: _reference_layers(keys, 0, f) if f else [],
            FROZEN_VALUES: _reference_layers(values, 0, f) if f else [],
            TRAINABLE_KEYS: _reference_layers(keys, f, None),
            TRAINABLE_VALUES: _reference_layers(values, f, None)}
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(data, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------- loading


def _load_error_reason(e: Exception) -> str:
    """The informative line of a torch.load error (weights-only errors open with boilerplate)."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _read_file(path: str) -> dict[str, Any]:
    torch = _torch()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such reference cartridge file")
    try:
        with torch.serialization.safe_globals([torch.nn.ParameterList]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise ReferenceFormatError(
            f"{path}: not a readable torch.save file of tensors ({_load_error_reason(e)})"
        ) from e
    if not isinstance(data, dict):
        raise ReferenceFormatError(f"{path}: holds a {type(data).__name__}, expected a dict "
                                   f"with keys {list(REFERENCE_KEYS)}")
    missing = [k for k in REFERENCE_KEYS if k not in data]
    if missing:
        raise ReferenceFormatError(f"{path}: missing keys {missing}; a reference cartridge has "
                                   f"{list(REFERENCE_KEYS)} (it has {sorted(map(str, data))})")
    return data


def _layer_arrays(path: str, data: dict[str, Any], name: str) -> list[np.ndarray]:
    """data[name] as per-layer numpy arrays [K, tokens, Dh] (the batch axis dropped), checked."""
    torch = _torch()
    seq = data[name]
    if not isinstance(seq, (list, tuple, torch.nn.ParameterList)):
        raise ReferenceFormatError(f"{path}: {name} is a {type(seq).__name__}, expected a "
                                   f"per-layer list of tensors [1, kv_heads, tokens, head_dim]")
    out = []
    for i, t in enumerate(seq):
        if not isinstance(t, torch.Tensor):
            raise ReferenceFormatError(f"{path}: {name}[{i}] is a {type(t).__name__}, expected "
                                       f"a tensor [1, kv_heads, tokens, head_dim]")
        if t.ndim != 4 or t.shape[0] != 1:
            raise ReferenceFormatError(f"{path}: {name}[{i}] has shape {list(t.shape)}, "
                                       f"expected [1, kv_heads, tokens, head_dim]")
        if not t.dtype.is_floating_point:
            raise ReferenceFormatError(f"{path}: {name}[{i}] is {t.dtype}, expected floating "
                                       f"point")
        out.append(_to_numpy(t)[0])
    return out


def _stack_layers(path: str, data: dict[str, Any], keys_name: str, values_name: str
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """The named keys/values lists as two arrays [L, tokens, K, Dh]; None for empty lists."""
    keys, values = _layer_arrays(path, data, keys_name), _layer_arrays(path, data, values_name)
    if len(keys) != len(values):
        raise ReferenceFormatError(f"{path}: {keys_name} has {len(keys)} layers, "
                                   f"{values_name} {len(values)}; expected one tensor per layer "
                                   f"in each")
    if not keys:
        return None
    first = keys[0]
    for name, arrays in ((keys_name, keys), (values_name, values)):
        for i, a in enumerate(arrays):
            if a.shape != first.shape or a.dtype != first.dtype:
                raise ReferenceFormatError(
                    f"{path}: {name}[{i}] is {a.dtype}[1, {', '.join(map(str, a.shape))}], "
                    f"{keys_name}[0] is {first.dtype}[1, {', '.join(map(str, first.shape))}]; "
                    f"expected every layer's keys and values to match")
    return (np.stack([a.transpose(1, 0, 2) for a in keys]),
            np.stack([a.transpose(1, 0, 2) for a in values]))


def load_reference_cartridge(path: str, *, model_fingerprint: str, doc_id: str = "",
                             expected_shape: tuple[int, int, int] | None = None) -> Cartridge:
    """Reads a reference `cartridge.pt` into a Cartridge of host numpy arrays [L, P, K, Dh].

    P = frozen + trainable tokens, meta.num_frozen = the frozen tokens in the file, dtype as
    stored; meta gets `model_fingerprint`, `doc_id` and init "reference". expected_shape:
    (num_layers, num_kv_heads, head_dim) of the model (see `kv_shape`), or None to skip the check.

    Raises FileNotFoundError, ReferenceFormatError (unreadable, missing keys, inconsistent or
    empty lists, no trainable tokens) or CartridgeMismatchError (shape differs from the model's).
    """
    data = _read_file(path)
    trainable = _stack_layers(path, data, TRAINABLE_KEYS, TRAINABLE_VALUES)
    if trainable is None:
        raise ReferenceFormatError(f"{path}: {TRAINABLE_KEYS} is empty, expected one tensor "
                                   f"per layer")
    keys, values = trainable
    layers, tokens, heads, head_dim = keys.shape
    if tokens == 0:
        raise ReferenceFormatError(f"{path}: zero trainable tokens, expected at least one")
    frozen = _stack_layers(path, data, FROZEN_KEYS, FROZEN_VALUES)
    num_frozen = 0
    if frozen is not None:
        fk, fv = frozen
        if len(fk) != layers:
            raise ReferenceFormatError(f"{path}: {FROZEN_KEYS} has {len(fk)} layers, "
                                       f"{TRAINABLE_KEYS} {layers}; expected equal lengths")
        if (fk.shape[2], fk.shape[3], fk.dtype) != (heads, head_dim, keys.dtype):
            raise ReferenceFormatError(
                f"{path}: frozen tokens are {fk.dtype} with {fk.shape[2]} kv heads x head_dim "
                f"{fk.shape[3]}, trainable ones {keys.dtype} with {heads} x {head_dim}; "
                f"expected them to agree")
        num_frozen = fk.shape[1]
        keys, values = np.concatenate([fk, keys], axis=1), np.concatenate([fv, values], axis=1)
    if expected_shape is not None and (layers, heads, head_dim) != tuple(expected_shape):
        want_l, want_k, want_d = expected_shape
        raise CartridgeMismatchError(
            f"{path}: a cartridge for {layers} layers x {heads} kv heads x head_dim {head_dim}, "
            f"expected the model's {want_l} layers x {want_k} kv heads x head_dim {want_d}")
    return Cartridge(keys=keys, values=values,
                     meta=CartridgeMeta(model_fingerprint, doc_id, num_frozen, IMPORTED_INIT))


# ----------------------------------------------------------------------------- cas_jax stores


def open_store(path: str, model_fingerprint: str, *, create: bool = False
               ) -> store_lib.CartridgeStore:
    """The CartridgeStore at `path`: a store root, or a train_collection folder's `cartridges/`.

    A folder holding neither becomes a new store root with `create`, else CartridgeNotFoundError.
    """
    for root in (path, os.path.join(path, "cartridges")):
        if os.path.exists(os.path.join(root, "STORE.json")):
            return store_lib.CartridgeStore(root, model_fingerprint)
    if not create:
        raise store_lib.CartridgeNotFoundError(
            f"{path}: no cartridge store (neither {path}/STORE.json nor "
            f"{path}/cartridges/STORE.json)")
    return store_lib.CartridgeStore(path, model_fingerprint)


def read_cas_cartridge(*, model_fingerprint: str, expected_shape: tuple[int, int, int],
                       store: str | None = None, doc_id: str | None = None,
                       cartridge_dir: str | None = None) -> Cartridge:
    """A cas_jax cartridge checked against the model: `doc_id` of `store` (see `open_store`), or
    `cartridge_dir`, a cartridge directory (`store.save_cartridge`, what `experiments.chat
    --cartridges` reads) or a train_cartridge --output_dir (its `cartridge/`)."""
    if (store is None) == (cartridge_dir is None) or (store is not None) != (doc_id is not None):
        raise ValueError("give either store and doc_id, or cartridge_dir")
    if store is not None:
        c = open_store(store, model_fingerprint).load_cartridge(doc_id)
        name = f"cartridge {doc_id!r} of {store}"
    else:
        nested = os.path.join(cartridge_dir, "cartridge")
        if (not os.path.exists(os.path.join(cartridge_dir, store_lib.CURRENT))
                and os.path.exists(os.path.join(nested, store_lib.CURRENT))):
            cartridge_dir = nested
        c = store_lib.load_cartridge(cartridge_dir, model_fingerprint)
        name = f"cartridge {cartridge_dir}"
    check_compatible(c, model_fingerprint, *expected_shape, name=name)
    return c


def export_cartridge(out: str, *, model_fingerprint: str, expected_shape: tuple[int, int, int],
                     store: str | None = None, doc_id: str | None = None,
                     cartridge_dir: str | None = None, overwrite: bool = False) -> Cartridge:
    """Writes a cas_jax cartridge (sources as in `read_cas_cartridge`) as a reference .pt at
    `out`; returns the cartridge. FileExistsError if `out` exists and not `overwrite`."""
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite to replace it")
    c = read_cas_cartridge(model_fingerprint=model_fingerprint, expected_shape=expected_shape,
                           store=store, doc_id=doc_id, cartridge_dir=cartridge_dir)
    save_reference_cartridge(c, out)
    return c


def import_cartridge(pt_path: str, store: str, doc_id: str, *, model_fingerprint: str,
                     expected_shape: tuple[int, int, int],
                     optimizer: optax.GradientTransformation | None = None,
                     with_opt_state: bool = True, overwrite: bool = False) -> Cartridge:
    """Saves the reference cartridge `pt_path` as `doc_id` of `store` (see `open_store`; created
    if absent) at step 0; returns it.

    with_opt_state: also store `optimizer`'s fresh state (default optimizer:
    `train.make_optimizer(train.TrainConfig())`, the state layout `train_collection` resumes
    from); without it the stored cartridge is for inference only. FileExistsError if `doc_id`
    is already stored and not `overwrite`.
    """
    c = load_reference_cartridge(pt_path, model_fingerprint=model_fingerprint, doc_id=doc_id,
                                 expected_shape=expected_shape)
    target = open_store(store, model_fingerprint, create=True)
    if target.exists(doc_id) and not overwrite:
        raise FileExistsError(f"cartridge {doc_id!r} is already in store {target.root}; pass "
                              f"overwrite to replace it")
    opt_state = None
    if with_opt_state:
        optimizer = optimizer or train.make_optimizer(train.TrainConfig())
        opt_state = jax.device_get(optimizer.init(single_parts(c)))
    target.save(doc_id, c, opt_state, step=0)
    return c
