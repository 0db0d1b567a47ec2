"""The PyTorch reference's cartridge file (HazyResearch/cartridges, `TrainableCache.save`) and
the Tokasaurus cartridge directory that serves it.

Reference file: a `torch.save` of a dict of four per-layer lists, one tensor per layer:
  frozen_keys, frozen_values         [1, kv_heads, num_frozen, head_dim]   the first tokens
  trainable_keys, trainable_values   [1, kv_heads, num_tokens - num_frozen, head_dim]
Files from before the reference's August 2025 refactor name the frozen lists fixed_keys /
fixed_values; both names are read, and either is written (`names`). Keys are stored after RoPE
with token t at position t, as in cas_jax, so a conversion is a transpose. With no frozen tokens
the frozen lists are empty. The reference saves `nn.ParameterList`s; `torch.load(weights_only=
True)` reads them (the class is allowed for that call only) as well as the plain lists written
here. Dtypes are kept bit for bit. The file carries no model identity: the loader stamps the
fingerprint it is given and checks the shape against the model.

Tokasaurus (`CartridgeManager.load_cartridge`, ScalingIntelligence/tokasaurus) serves cartridge
`<id>` from `<cartridge_dir>/<id>/`: `cartridge.pt` (the reference file, either names) plus
`config.yaml`, whose `kv_cache_initializer.max_tokens` is the number of KV slots it reserves.
It holds a cartridge in whole pages of its paged KV cache (`page_size`, 16 by default): frozen +
trainable tokens that are not a multiple of the page size lose their last trainable tokens
(and a max_tokens that is not a multiple fails to load), so such a cartridge is refused here.
It reads `fixed_keys[0]`, so with no frozen tokens the frozen lists hold zero-token tensors.
It finds `<id>`'s directory through `sanitize_cartridge_id` ('/' and '\\' become '-'; dots and
':|*?<>"' and quotes become '_'; runs of '-'/'_' collapse to one '_'), so name the directory
what that gives for the id; letters, digits and single '-' or '_' are kept as they are.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from cas_jax.cartridges.cartridge import Cartridge, CartridgeMeta
from cas_jax.interop.common import (CartridgeFormatError, check_model_shape, kv_arrays, to_numpy,
                                    to_torch, torch_module, write_atomically)

TRAINABLE_KEYS, TRAINABLE_VALUES = "trainable_keys", "trainable_values"
FROZEN_NAMES = {"frozen": ("frozen_keys", "frozen_values"),  # the reference since August 2025
                "fixed": ("fixed_keys", "fixed_values")}     # before, and Tokasaurus's own
TOKASAURUS_PAGE_SIZE = 16  # Tokasaurus's default ServerConfig.page_size
CARTRIDGE_FILE, CONFIG_FILE = "cartridge.pt", "config.yaml"


# ----------------------------------------------------------------------------- writing


def _reference_layers(a: np.ndarray, start: int, stop: int | None) -> list:
    """Tokens [start:stop] of a [L, P, K, Dh] array as L tensors [1, K, tokens, Dh]."""
    return [to_torch(layer[start:stop].transpose(1, 0, 2)[None]) for layer in a]


def _reference_dict(cartridge: Cartridge, names: str, empty_frozen_tensors: bool
                    ) -> dict[str, list]:
    if names not in FROZEN_NAMES:
        raise ValueError(f"frozen token names {names!r}: expected one of {list(FROZEN_NAMES)}")
    keys, values = kv_arrays(cartridge)
    f = cartridge.meta.num_frozen
    frozen_keys, frozen_values = FROZEN_NAMES[names]
    keep = f or empty_frozen_tensors
    return {frozen_keys: _reference_layers(keys, 0, f) if keep else [],
            frozen_values: _reference_layers(values, 0, f) if keep else [],
            TRAINABLE_KEYS: _reference_layers(keys, f, None),
            TRAINABLE_VALUES: _reference_layers(values, f, None)}


def save_reference_cartridge(cartridge: Cartridge, path: str, *, names: str = "frozen") -> None:
    """Writes `cartridge` (keys/values [L, P, K, Dh]) as a reference `cartridge.pt` at `path`:
    its first `meta.num_frozen` tokens as frozen_* (names="frozen") or fixed_* ("fixed"), the
    rest as trainable_*, dtype unchanged. Written next to `path` and renamed into place."""
    data = _reference_dict(cartridge, names, empty_frozen_tensors=False)
    write_atomically(path, lambda tmp: torch_module().save(data, tmp))


def check_page_aligned(num_tokens: int, num_frozen: int, page_size: int, name: str) -> None:
    """ValueError stating Tokasaurus's rule unless frozen + trainable tokens fill whole pages."""
    if page_size < 1:
        raise ValueError(f"page size {page_size}: expected a positive number of tokens")
    if num_tokens % page_size:
        down = num_tokens - num_tokens % page_size
        options = " or ".join(str(n) for n in (down, down + page_size) if n)
        raise ValueError(
            f"{name}: Tokasaurus keeps frozen + trainable tokens in whole pages of {page_size} "
            f"and would drop the last {num_tokens % page_size} of these {num_tokens} "
            f"({num_frozen} frozen + {num_tokens - num_frozen} trainable); export a cartridge "
            f"whose token count is a multiple of {page_size} (e.g. {options}), or set "
            f"page_size to the server's")


def save_tokasaurus_cartridge(cartridge: Cartridge, directory: str, *,
                              page_size: int = TOKASAURUS_PAGE_SIZE,
                              names: str = "frozen") -> None:
    """Writes `directory`/cartridge.pt (the reference file; zero-token frozen tensors when
    nothing is frozen) and `directory`/config.yaml (kv_cache_initializer.max_tokens = P,
    num_frozen_tokens; a cas_jax section with the model fingerprint and doc id).

    ValueError (with the rule) if P is not a multiple of `page_size`, Tokasaurus's page size.
    """
    import yaml

    p, f = cartridge.num_tokens, cartridge.meta.num_frozen
    check_page_aligned(p, f, page_size, f"cartridge {cartridge.meta.doc_id!r}")
    data = _reference_dict(cartridge, names, empty_frozen_tensors=True)
    config = {"kv_cache_initializer": {"max_tokens": p, "num_frozen_tokens": f},
              "cas_jax": {"model_fingerprint": cartridge.meta.model_fingerprint,
                          "doc_id": cartridge.meta.doc_id}}
    os.makedirs(directory, exist_ok=True)
    write_atomically(os.path.join(directory, CARTRIDGE_FILE),
                     lambda tmp: torch_module().save(data, tmp))

    def write_config(tmp):
        with open(tmp, "w") as fh:
            yaml.safe_dump(config, fh, sort_keys=False)

    write_atomically(os.path.join(directory, CONFIG_FILE), write_config)


# ----------------------------------------------------------------------------- reading


def _load_error_reason(e: Exception) -> str:
    """The informative line of a torch.load error (weights-only errors open with boilerplate)."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _expected_names() -> str:
    return (f"{TRAINABLE_KEYS}, {TRAINABLE_VALUES} and either frozen_keys, frozen_values (the "
            f"reference since August 2025) or fixed_keys, fixed_values (before)")


def _read_file(path: str) -> tuple[dict[str, Any], tuple[str, str]]:
    """The file's dict and the names of its frozen lists, checked for the four lists."""
    torch = torch_module()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such reference cartridge file")
    try:
        with torch.serialization.safe_globals([torch.nn.ParameterList]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise CartridgeFormatError(
            f"{path}: not a readable torch.save file of tensors ({_load_error_reason(e)})"
        ) from e
    if not isinstance(data, dict):
        raise CartridgeFormatError(f"{path}: holds a {type(data).__name__}, expected a dict "
                                   f"with {_expected_names()}")
    present = [names for names in FROZEN_NAMES.values() if any(n in data for n in names)]
    if len(present) > 1:
        raise CartridgeFormatError(f"{path}: has both frozen_* and fixed_* lists, expected one "
                                   f"of them (they name the same tokens)")
    frozen = present[0] if present else FROZEN_NAMES["frozen"]
    missing = [k for k in (TRAINABLE_KEYS, TRAINABLE_VALUES) + frozen if k not in data]
    if missing:
        raise CartridgeFormatError(f"{path}: missing keys {missing}; a reference cartridge has "
                                   f"{_expected_names()} (it has {sorted(map(str, data))})")
    return data, frozen


def _layer_arrays(path: str, data: dict[str, Any], name: str) -> list[np.ndarray]:
    """data[name] as per-layer numpy arrays [K, tokens, Dh] (the batch axis dropped), checked."""
    torch = torch_module()
    seq = data[name]
    if not isinstance(seq, (list, tuple, torch.nn.ParameterList)):
        raise CartridgeFormatError(f"{path}: {name} is a {type(seq).__name__}, expected a "
                                   f"per-layer list of tensors [1, kv_heads, tokens, head_dim]")
    out = []
    for i, t in enumerate(seq):
        if not isinstance(t, torch.Tensor):
            raise CartridgeFormatError(f"{path}: {name}[{i}] is a {type(t).__name__}, expected "
                                       f"a tensor [1, kv_heads, tokens, head_dim]")
        if t.ndim != 4 or t.shape[0] != 1:
            raise CartridgeFormatError(f"{path}: {name}[{i}] has shape {list(t.shape)}, "
                                       f"expected [1, kv_heads, tokens, head_dim]")
        if not t.dtype.is_floating_point:
            raise CartridgeFormatError(f"{path}: {name}[{i}] is {t.dtype}, expected floating "
                                       f"point")
        out.append(to_numpy(t)[0])
    return out


def _stack_layers(path: str, data: dict[str, Any], keys_name: str, values_name: str
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """The named keys/values lists as two arrays [L, tokens, K, Dh]; None for empty lists."""
    keys, values = _layer_arrays(path, data, keys_name), _layer_arrays(path, data, values_name)
    if len(keys) != len(values):
        raise CartridgeFormatError(f"{path}: {keys_name} has {len(keys)} layers, "
                                   f"{values_name} {len(values)}; expected one tensor per layer "
                                   f"in each")
    if not keys:
        return None
    first = keys[0]
    for name, arrays in ((keys_name, keys), (values_name, values)):
        for i, a in enumerate(arrays):
            if a.shape != first.shape or a.dtype != first.dtype:
                raise CartridgeFormatError(
                    f"{path}: {name}[{i}] is {a.dtype}[1, {', '.join(map(str, a.shape))}], "
                    f"{keys_name}[0] is {first.dtype}[1, {', '.join(map(str, first.shape))}]; "
                    f"expected every layer's keys and values to match")
    return (np.stack([a.transpose(1, 0, 2) for a in keys]),
            np.stack([a.transpose(1, 0, 2) for a in values]))


def _load_kv(path: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(keys, values [L, P, K, Dh], num_frozen) of a reference file, checked for consistency."""
    data, (frozen_keys, frozen_values) = _read_file(path)
    trainable = _stack_layers(path, data, TRAINABLE_KEYS, TRAINABLE_VALUES)
    if trainable is None:
        raise CartridgeFormatError(f"{path}: {TRAINABLE_KEYS} is empty, expected one tensor "
                                   f"per layer")
    keys, values = trainable
    layers, tokens, heads, head_dim = keys.shape
    if tokens == 0:
        raise CartridgeFormatError(f"{path}: zero trainable tokens, expected at least one")
    frozen = _stack_layers(path, data, frozen_keys, frozen_values)
    if frozen is None:
        return keys, values, 0
    fk, fv = frozen
    if len(fk) != layers:
        raise CartridgeFormatError(f"{path}: {frozen_keys} has {len(fk)} layers, "
                                   f"{TRAINABLE_KEYS} {layers}; expected equal lengths")
    if (fk.shape[2], fk.shape[3], fk.dtype) != (heads, head_dim, keys.dtype):
        raise CartridgeFormatError(
            f"{path}: frozen tokens are {fk.dtype} with {fk.shape[2]} kv heads x head_dim "
            f"{fk.shape[3]}, trainable ones {keys.dtype} with {heads} x {head_dim}; "
            f"expected them to agree")
    return (np.concatenate([fk, keys], axis=1), np.concatenate([fv, values], axis=1),
            fk.shape[1])


def load_reference_cartridge(path: str, *, model_fingerprint: str, doc_id: str = "",
                             expected_shape: tuple[int, int, int] | None = None) -> Cartridge:
    """Reads a reference `cartridge.pt` (frozen_* or fixed_* names) into a Cartridge of host
    numpy arrays [L, P, K, Dh].

    P = frozen + trainable tokens, meta.num_frozen = the frozen tokens in the file, dtype as
    stored; meta gets `model_fingerprint`, `doc_id` and init "reference". expected_shape:
    (num_layers, num_kv_heads, head_dim) of the model (`interop.kv_shape`), or None.

    Raises FileNotFoundError, CartridgeFormatError (unreadable, missing keys, inconsistent or
    empty lists, no trainable tokens) or CartridgeMismatchError (shape differs from the model's).
    """
    keys, values, num_frozen = _load_kv(path)
    check_model_shape(path, keys.shape[0], keys.shape[2], keys.shape[3], expected_shape)
    return Cartridge(keys=keys, values=values,
                     meta=CartridgeMeta(model_fingerprint, doc_id, num_frozen, "reference"))


def _config_max_tokens(path: str) -> int:
    """kv_cache_initializer.max_tokens of a Tokasaurus config.yaml (also its wandb form,
    kv_cache_initializer.value.max_tokens), as Tokasaurus reads it."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (Tokasaurus needs config.yaml with "
                                f"kv_cache_initializer.max_tokens beside cartridge.pt)")
    try:
        with open(path) as fh:
            config = yaml.safe_load(fh)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CartridgeFormatError(f"{path}: not readable YAML ({type(e).__name__})") from e
    init = config.get("kv_cache_initializer") if isinstance(config, dict) else None
    if isinstance(init, dict) and "max_tokens" not in init and isinstance(init.get("value"),
                                                                             dict):
        init = init["value"]
    max_tokens = init.get("max_tokens") if isinstance(init, dict) else None
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise CartridgeFormatError(f"{path}: kv_cache_initializer.max_tokens is "
                                   f"{max_tokens!r}, expected a positive integer")
    return max_tokens


def load_tokasaurus_cartridge(directory: str, *, model_fingerprint: str, doc_id: str = "",
                              expected_shape: tuple[int, int, int] | None = None) -> Cartridge:
    """Reads a Tokasaurus cartridge directory (cartridge.pt + config.yaml) as
    `load_reference_cartridge` does, with init "tokasaurus"; CartridgeFormatError if the
    config's max_tokens is not the file's frozen + trainable tokens."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such Tokasaurus cartridge directory "
                                f"(expected {CARTRIDGE_FILE} and {CONFIG_FILE} in it)")
    config_path = os.path.join(directory, CONFIG_FILE)
    max_tokens = _config_max_tokens(config_path)
    pt = os.path.join(directory, CARTRIDGE_FILE)
    c = load_reference_cartridge(pt, model_fingerprint=model_fingerprint, doc_id=doc_id,
                                 expected_shape=expected_shape)
    if max_tokens != c.num_tokens:
        raise CartridgeFormatError(f"{config_path}: max_tokens {max_tokens}, but {pt} holds "
                                   f"{c.num_tokens} tokens; expected them equal")
    return c.replace(meta=CartridgeMeta(model_fingerprint, doc_id, c.meta.num_frozen,
                                        "tokasaurus"))
