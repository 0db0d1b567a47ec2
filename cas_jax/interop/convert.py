"""Cartridges in and out of cas_jax: the files other projects read, and the library functions
of `experiments.export_cartridge` / `import_cartridge`.

Formats (`FORMATS`; each module documents its layout and its consumer):
  reference     the PyTorch reference's `cartridge.pt`, frozen_* names or the pre-August-2025
                fixed_* names (`interop_reference`)
  tokasaurus    a Tokasaurus cartridge directory: cartridge.pt + config.yaml, frozen + trainable
                tokens a whole number of pages (`interop_reference`)
  peft          a Hugging Face PEFT CARTRIDGE adapter folder (`interop_peft`)
  vllm_prefix   per-layer prefix tensors [1, P, K, Dh] in one safetensors file (`interop_vllm`)
All of them hold keys after RoPE with token t at position t, and their consumers start the
queries at P, as cas_jax does, so a conversion only moves bits: a round trip in the stored dtype
is bitwise. The files name no model that cas_jax checks (the config.yaml it writes for
Tokasaurus records the fingerprint, for people): the loader stamps the fingerprint it is given
and checks the shape (layers, kv heads, head dim) against the model.

Dtypes (`DTYPES`): "keep" writes the stored dtype; "f32" and "bf16" cast first (bf16 rounds to
nearest even, as torch's .to(torch.bfloat16) does; the reference's cartridges are bf16).

Several cartridges in one file (`compose_one_sink`), for consumers that read one prefix: the
cartridges in the order given, token 0 (the attention sink) of all but the first dropped, as
`attention.compose` shows them. The consumer starts the queries after all those tokens: the
`serial` composition geometry with plain attention logits; the `parallel` one, reshaped
prefix logits or relevance routing (biases that depend on each question) cannot be written as
one prefix, and exporting several cartridges that cas_jax reads otherwise logs a warning.

`store` arguments below are a CartridgeStore root (it holds STORE.json) or the --store folder of
`experiments.train_collection` (whose store is its `cartridges/` folder).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import jax
import ml_dtypes
import numpy as np
import optax

from cas_jax.cartridges import store as store_lib
from cas_jax.cartridges.attention import Geometry
from cas_jax.cartridges.cartridge import Cartridge, CartridgeMeta, check_compatible
from cas_jax.interop.common import CartridgeFormatError
from cas_jax.interop.peft_format import load_peft_cartridge, save_peft_cartridge
from cas_jax.interop.reference_format import (FROZEN_NAMES, TOKASAURUS_PAGE_SIZE,
                                              load_reference_cartridge, load_tokasaurus_cartridge,
                                              save_reference_cartridge, save_tokasaurus_cartridge)
from cas_jax.interop.vllm_format import load_vllm_prefix, save_vllm_prefix
from cas_jax.model.config import ModelConfig
from cas_jax.training import train
from cas_jax.training.train_collection import single_parts

__all__ = ["DTYPES", "FORMATS", "FROZEN_NAMES", "CartridgeFormatError", "cast",
           "compose_one_sink", "export_cartridge", "import_cartridge", "kv_shape", "load",
           "load_peft_cartridge", "load_reference_cartridge", "load_tokasaurus_cartridge",
           "load_vllm_prefix", "open_store", "read_cas_cartridge", "save",
           "save_peft_cartridge", "save_reference_cartridge", "save_tokasaurus_cartridge",
           "save_vllm_prefix", "TOKASAURUS_PAGE_SIZE"]

FORMATS = ("reference", "tokasaurus", "peft", "vllm_prefix")
DTYPES = {"keep": None, "f32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16)}
_LOADERS = {"reference": load_reference_cartridge, "tokasaurus": load_tokasaurus_cartridge,
            "peft": load_peft_cartridge, "vllm_prefix": load_vllm_prefix}


def kv_shape(config: ModelConfig) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim): what a cartridge's shape must match for `config`."""
    return config.num_layers, config.num_kv_heads, config.head_dim


def _check_choice(kind: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{kind} {value!r}: expected one of {list(choices)}")


def cast(cartridge: Cartridge, dtype: str) -> Cartridge:
    """`cartridge` as host arrays of DTYPES[dtype] ("keep": unchanged dtype)."""
    _check_choice("dtype", dtype, DTYPES)
    target = DTYPES[dtype]
    keys, values = np.asarray(cartridge.keys), np.asarray(cartridge.values)
    if target is None or keys.dtype == target:
        return cartridge.replace(keys=keys, values=values)
    return cartridge.replace(keys=keys.astype(target), values=values.astype(target))


def compose_one_sink(cartridges: Sequence[Cartridge]) -> Cartridge:
    """One cartridge [L, P_1 + sum(P_i - 1), K, Dh] of `cartridges` in order, token 0 of all but
    the first dropped (module doc); num_frozen and fingerprint of the first, doc ids joined by
    '+', init "composed". A single cartridge is returned as it is."""
    if not cartridges:
        raise ValueError("compose_one_sink: need at least one cartridge")
    if len(cartridges) == 1:
        return cartridges[0]
    dtypes = {np.asarray(c.keys).dtype for c in cartridges}
    if len(dtypes) > 1:
        raise ValueError(f"cartridges of dtypes {sorted(map(str, dtypes))} cannot share a file; "
                         f"cast them to one (dtype f32 or bf16)")
    first = cartridges[0]
    keys = [np.asarray(first.keys)] + [np.asarray(c.keys)[:, 1:] for c in cartridges[1:]]
    values = [np.asarray(first.values)] + [np.asarray(c.values)[:, 1:] for c in cartridges[1:]]
    meta = CartridgeMeta(first.meta.model_fingerprint,
                         "+".join(c.meta.doc_id for c in cartridges), first.meta.num_frozen,
                         "composed")
    return Cartridge(np.concatenate(keys, axis=1), np.concatenate(values, axis=1), meta)


def save(cartridge: Cartridge, out: str, format: str, *, names: str = "frozen",
         page_size: int = TOKASAURUS_PAGE_SIZE) -> None:
    """Writes `cartridge` at `out` in `format`: the .pt file (reference), the cartridge's own
    directory <cartridge_dir>/<id> (tokasaurus), the adapter folder (peft) or the .safetensors
    file (vllm_prefix). names: "frozen" or "fixed" (the .pt formats); page_size: tokasaurus."""
    _check_choice("format", format, FORMATS)
    if format == "reference":
        save_reference_cartridge(cartridge, out, names=names)
    elif format == "tokasaurus":
        save_tokasaurus_cartridge(cartridge, out, page_size=page_size, names=names)
    elif format == "peft":
        save_peft_cartridge(cartridge, out)
    else:
        save_vllm_prefix(cartridge, out)


def load(path: str, format: str, *, model_fingerprint: str, doc_id: str = "",
         expected_shape: tuple[int, int, int] | None = None) -> Cartridge:
    """A cartridge of host arrays [L, P, K, Dh] from `path` in `format` (paths as in `save`),
    stamped with `model_fingerprint` and `doc_id`, init = the format's name; checked against
    expected_shape (`kv_shape`) unless None. Raises FileNotFoundError, CartridgeFormatError
    (naming the file and what was expected) or CartridgeMismatchError."""
    _check_choice("format", format, FORMATS)
    return _LOADERS[format](path, model_fingerprint=model_fingerprint, doc_id=doc_id,
                            expected_shape=expected_shape)


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
                     format: str = "reference", store: str | None = None,
                     doc_ids: Sequence[str] = (), cartridge_dirs: Sequence[str] = (),
                     dtype: str = "keep", names: str = "frozen",
                     page_size: int = TOKASAURUS_PAGE_SIZE, overwrite: bool = False
                     ) -> Cartridge:
    """Writes cas_jax cartridges as one file of `format` at `out` (see `save`); returns what was
    written. Sources: `doc_ids` of `store`, or `cartridge_dirs` (see `read_cas_cartridge`);
    several are composed with one sink (`compose_one_sink`), then cast to `dtype`.
    FileExistsError if `out` exists and not `overwrite`; ValueError for a tokasaurus cartridge
    that does not fill whole pages."""
    _check_choice("format", format, FORMATS)
    _check_choice("dtype", dtype, DTYPES)
    _check_choice("frozen token names", names, FROZEN_NAMES)
    by_store = store is not None and bool(doc_ids) and not cartridge_dirs
    if not by_store and (store is not None or doc_ids or not cartridge_dirs):
        raise ValueError("give either store and doc_ids, or cartridge_dirs")
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite to replace it")
    common = dict(model_fingerprint=model_fingerprint, expected_shape=expected_shape)
    sources = ([read_cas_cartridge(store=store, doc_id=d, **common) for d in doc_ids]
               or [read_cas_cartridge(cartridge_dir=d, **common) for d in cartridge_dirs])
    read = {str(Geometry.parse(s.meta.geometry)) for s in sources}
    if len(sources) > 1 and read != {"serial"}:
        logging.warning("cas_jax composes these cartridges under %s; one file holds the serial "
                        "composition only, which is how its consumer will read them",
                        " / ".join(sorted(read)))
    c = compose_one_sink([cast(s, dtype) for s in sources])
    save(c, out, format, names=names, page_size=page_size)
    return c


def import_cartridge(path: str, store: str, doc_id: str, *, model_fingerprint: str,
                     expected_shape: tuple[int, int, int], format: str = "reference",
                     dtype: str = "keep", optimizer: optax.GradientTransformation | None = None,
                     with_opt_state: bool = True, overwrite: bool = False) -> Cartridge:
    """Saves the `format` cartridge at `path` (see `save`), cast to `dtype`, as `doc_id` of
    `store` (see `open_store`; created if absent) at step 0; returns it.

    with_opt_state: also store `optimizer`'s fresh state (default optimizer:
    `train.make_optimizer(train.TrainConfig())`, the state layout `train_collection` resumes
    from); without it the stored cartridge is for inference only. FileExistsError if `doc_id`
    is already stored and not `overwrite`.
    """
    c = cast(load(path, format, model_fingerprint=model_fingerprint, doc_id=doc_id,
                  expected_shape=expected_shape), dtype)
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
