"""A collection's cartridges at step 0, and the per-cartridge optimizer state they carry.

Every cartridge of a collection has its own Adam state: `optimizer.init` of its `single_parts`
(the {frozen, trainable} split of `train.split_cartridges`, with no slot axis), saved with it in
the store. `initial_cartridge` makes one document's step-0 cartridge, `initialise_store`
creates the cartridges a store lacks; `opt_template_fn` is what
the store restores their optimizer state into.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from cas_jax.cartridges import cartridge as cart_lib, kv_compression
from cas_jax.cartridges.cartridge import Cartridge
from cas_jax.cartridges.store import CartridgeStore, cached_opt_template
from cas_jax.model import rendering
from cas_jax.model.loading import LoadedModel
from cas_jax.training import train

INITS = ("first_tokens", "document_kv", "sampled_chunks")
CHUNK_TOKENS = 16
"""Chunk length of the `sampled_chunks` init."""


def document_tokens(tokenizer, text: str, num_tokens: int | None,
                    format: str = rendering.DEFAULT_FORMAT) -> np.ndarray:
    """The first num_tokens tokens of text's document block (`cas_jax.model.rendering`), where the
    cartridge will stand; a shorter block is repeated to fill them (None: the whole block)."""
    if not text.strip():
        raise ValueError("cannot initialise a cartridge from an empty document")
    ids = np.asarray(rendering.rendering_for(tokenizer, format).document(text), np.int32)
    return ids if num_tokens is None else np.resize(ids, num_tokens)


def sampled_chunk_tokens(block: np.ndarray, num_tokens: int, doc_id: str,
                         chunk: int = CHUNK_TOKENS) -> np.ndarray:
    """`num_tokens` tokens of a document block for the `sampled_chunks` init: its first
    `chunk` tokens (the sink and the block's opening), then chunks drawn without replacement
    from the rest of the block cut at multiples of `chunk`, kept in document order, the last
    one cut to fit. The draw is seeded by `doc_id`, so a document always gets the same tokens.
    A block of at most `num_tokens` tokens gives `document_tokens`' (repeated to fill)."""
    block = np.asarray(block, np.int32).reshape(-1)
    if len(block) <= num_tokens:
        return np.resize(block, num_tokens)
    head = min(chunk, num_tokens)
    starts = np.arange(head, len(block), chunk)
    need = -(-(num_tokens - head) // chunk)
    rng = np.random.default_rng(zlib.crc32(doc_id.encode()))
    picked = np.sort(rng.choice(starts, size=min(need, len(starts)), replace=False))
    tokens = np.concatenate([block[:head], *(block[s:s + chunk] for s in picked)])
    return np.resize(tokens, num_tokens) if len(tokens) < num_tokens else tokens[:num_tokens]


def single_parts(c: Cartridge) -> dict:
    """One cartridge's {frozen, trainable} parts (no slot axis), as `train` splits them."""
    parts = train.split_cartridges(c.keys[None], c.values[None], c.meta.num_frozen)
    return jax.tree.map(lambda x: x[0], parts)


def opt_template_fn(optimizer: optax.GradientTransformation) -> Callable[[Cartridge], Any]:
    """What the store restores a cartridge's optimizer state into (shapes only, traced once
    per cartridge shape)."""
    return cached_opt_template(lambda c: optimizer.init(single_parts(c)))


def initial_cartridge(model: LoadedModel, doc_id: str, text: str, tokens_per_doc: int,
                      num_frozen: int = 1, init: str = "first_tokens",
                      geometry: str = "serial") -> Cartridge:
    """`doc_id`'s cartridge at step 0, as host arrays: what `initialise_store` saves for it
    (init and geometry as there); also the untrained stand-in for a document whose cartridge
    was never trained."""
    if init not in INITS:
        raise ValueError(f"init {init!r}: expected one of {INITS}")
    common = dict(fingerprint=model.fingerprint, doc_id=doc_id, num_frozen=num_frozen)
    block = document_tokens(model.tokenizer, text, None)
    if init == "document_kv" and len(block) > tokens_per_doc:
        c = kv_compression.init_from_document_kv(model.config, model.params, block,
                                                 tokens_per_doc, **common)
    elif init == "sampled_chunks":
        c = cart_lib.init_from_tokens(model.config, model.params,
                                      sampled_chunk_tokens(block, tokens_per_doc, doc_id),
                                      **common)
        c = c.replace(meta=dataclasses.replace(c.meta, init="sampled_chunks"))
    else:
        c = cart_lib.init_from_tokens(model.config, model.params,
                                      np.resize(block, tokens_per_doc), **common)
    c = jax.device_get(c)
    return c.replace(meta=dataclasses.replace(c.meta, geometry=geometry))


def initialise_store(store: CartridgeStore, model: LoadedModel, texts: dict[str, str],
                     tokens_per_doc: int, optimizer: optax.GradientTransformation,
                     num_frozen: int = 1, init: str = "first_tokens",
                     geometry: str = "serial") -> list[str]:
    """Saves a fresh cartridge (with fresh optimizer state) for every document the store lacks;
    returns the ids it created. init: "first_tokens" (the K/V of the document block's first P
    tokens, the paper's default) or "document_kv" (`kv_compression`: the whole block's K/V
    compressed to its P most-attended positions; a block shorter than P falls back to
    first_tokens) or "sampled_chunks" (the K/V of the block's opening and chunks sampled
    through the rest of it, `sampled_chunk_tokens`). geometry: the composition geometry
    training will use, kept in each cartridge's meta. Each document's text is recorded in
    the store too (`CartridgeStore.save_document`, also for a cartridge made before), which
    is what a reader routes by."""
    if init not in INITS:
        raise ValueError(f"init {init!r}: expected one of {INITS}")
    made = []
    for doc_id, text in texts.items():
        if not os.path.exists(store.document_path(doc_id)):
            store.save_document(doc_id, text)
        if store.exists(doc_id):
            continue
        c = initial_cartridge(model, doc_id, text, tokens_per_doc, num_frozen, init, geometry)
        store.save(doc_id, c, jax.device_get(optimizer.init(single_parts(c))), step=0)
        made.append(doc_id)
    return made
