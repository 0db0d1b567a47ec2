"""The server's cartridges: the store's catalogue, request checks, paging and the bank.

`Catalogue` reads manifests (once per version), refuses a request's cartridges before it is
queued (unknown -> 404; unreadable, corrupt or made for another model -> 422; too many,
repeated, too long, over the budget or the window -> 400) and pins them in the one
`BudgetManager`, the only cache of resident cartridges. Its messages name cartridges and
files relative to the store, never a server path.

`BankSlots` mirrors the pinned cartridges into the fixed-shape `CartridgeBank` that
`attention.compose` reads: a slot is held while a request in flight uses its cartridge; a free
slot keeps its contents, and is reused without a copy if the same cartridge (the budget
manager's same device array) comes back before the slot is given to another. A free slot for
a new cartridge is taken first among those whose cartridge the budget manager has evicted.
The bank (outside `budget_bytes`) is bank_slots x layers x max_cartridge_tokens x kv_heads x
head_dim x 2 arrays in the model dtype.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cas_jax.cartridges import attention, budget as budget_lib, store as store_lib
from cas_jax.cartridges.cartridge import Cartridge, CartridgeMismatchError
from cas_jax.documents import retrieval
from cas_jax.model import decoder as decoder_lib
from cas_jax.model.loading import LoadedModel
from cas_jax.serving.engine import ServeConfig, ServeError


@dataclasses.dataclass(frozen=True)
class CartridgeInfo:
    """What a cartridge's manifest says: tokens, bytes of keys + values, its model."""

    id: str
    tokens: int
    bytes: int
    fingerprint: str
    shape: tuple[int, ...]  # keys [layers, tokens, kv_heads, head_dim]
    geometry: str = "serial"  # the composition geometry it was trained under (its meta)
    dtype: str = "float32"  # of its keys and values


def _refuse(status: int, message: str, code: str) -> ServeError:
    return ServeError(status, message, param="cartridges", code=code)


class Catalogue:
    """The store's cartridges as the server sees them (module doc)."""

    def __init__(self, model: LoadedModel, store: store_lib.CartridgeStore, config: ServeConfig):
        self.model, self.store, self.config = model, store, config
        self.budget = budget_lib.BudgetManager(store, config.budget_bytes)
        self.lock = threading.Lock()  # the budget manager is used by one thread at a time
        self._manifests: dict[str, tuple[str, CartridgeInfo]] = {}  # id -> (version, info)
        infos = [i for i in self._infos().values() if isinstance(i, CartridgeInfo)]
        self.max_cartridge_tokens = config.max_cartridge_tokens or max(
            (i.tokens for i in infos), default=128)
        if config.geometry is None:
            self.config = dataclasses.replace(config, geometry=attention.common_geometry(
                [(i.id, i.geometry) for i in infos]))
        else:  # the operator's choice, as --geometry is for chat and evaluation
            other = {i.id: i.geometry for i in infos
                     if attention.Geometry.parse(i.geometry) != config.geometry}
            if other:
                logging.warning("serving under geometry %r cartridges trained under another: "
                                "%s", str(config.geometry), other)
        self.geometry: attention.Geometry = self.config.geometry
        self.router: retrieval.Router | None = None
        self.routing: dict | None = None  # how a routed request is scored (GET /health)
        if self.geometry.relevance > 0:
            try:
                documents = config.documents or store.documents()
            except store_lib.CartridgeStoreError as e:  # start-up refuses it, as a bad config
                raise ValueError(f"the store's documents cannot be routed by: {e}") from None
            self.routing = {"router": config.router, "documents": len(documents),
                            "from": "config" if config.documents else "store"}
            if not documents:
                raise ValueError(f"geometry {self.geometry} routes by relevance, which scores "
                                 f"a request's cartridges by their documents' texts, and the "
                                 f"store records none: serve with --documents (the collection "
                                 f"the cartridges stand for), or --geometry without relevance")
            self.router = retrieval.Router(
                retrieval.make_retriever(config.router, documents), documents)

    def biases(self, query: str, ids: list[str]) -> tuple[float, ...]:
        """The request's cartridge logit biases under a routing geometry (none otherwise):
        `retrieval.Router.biases` of `query` (its last user message); 400 names a cartridge
        whose document the server does not hold."""
        if self.router is None:
            return ()
        try:
            return tuple(self.router.biases(query, ids, self.geometry.relevance,
                                            self.geometry.relevance_floor))
        except KeyError as e:
            raise _refuse(400, f"cartridges are routed by their documents' relevance to the "
                          f"question, and {e.args[0]}", "cartridge_not_routable") from None

    def public(self, message: str) -> str:
        """`message` with the store's root removed from the paths it names."""
        return message.replace(self.store.root + os.sep, "").replace(self.store.root, ".")

    def info(self, doc_id: str) -> CartridgeInfo:
        """The manifest facts of `doc_id`; ServeError 404 if unknown, 422 if unreadable."""
        try:
            self.store.cartridge_dir(doc_id)
        except ValueError as e:
            raise _refuse(404, f"no cartridge {doc_id!r}: {e}", "cartridge_not_found") from None
        try:
            version, manifest = self.store.manifest(doc_id)
            cached = self._manifests.get(doc_id)
            if cached is not None and cached[0] == version:
                return cached[1]
            keys = next(a for a in manifest["arrays"] if a["name"] == "keys")
            meta = manifest["meta"]
            info = CartridgeInfo(doc_id, int(keys["shape"][1]), 2 * int(keys["nbytes"]),
                                 meta["model_fingerprint"], tuple(keys["shape"]),
                                 str(attention.Geometry.parse(meta.get("geometry", "serial"))),
                                 str(jnp.dtype(keys["dtype"])))
        except store_lib.CartridgeNotFoundError:
            raise _refuse(404, f"no cartridge {doc_id!r} in the store",
                          "cartridge_not_found") from None
        except (store_lib.CartridgeStoreError, OSError, KeyError, IndexError, StopIteration,
                TypeError, ValueError) as e:
            reason = f"{type(e).__name__}" if isinstance(e, OSError) else (e or type(e).__name__)
            raise _refuse(422, self.public(f"cartridge {doc_id!r} is unreadable: {reason}"),
                          "cartridge_corrupt") from None
        self._manifests[doc_id] = (version, info)
        return info

    def _infos(self) -> dict[str, CartridgeInfo | ServeError]:
        out = {}
        for doc_id in self.store.list():
            try:
                out[doc_id] = self.info(doc_id)
            except ServeError as e:
                out[doc_id] = e
        return out

    def rows(self) -> list[dict]:
        """Every cartridge in the store: id, tokens, bytes and resident (on the device), or the
        error that makes it unusable."""
        with self.lock:
            resident = set(self.budget.resident_ids())
        rows = []
        for doc_id, info in self._infos().items():
            row = {"id": doc_id, "object": "cartridge"}
            try:
                if isinstance(info, ServeError):
                    raise info
                row.update(tokens=info.tokens, bytes=info.bytes, resident=doc_id in resident)
                self.check_usable(info)
            except ServeError as e:
                row["error"] = e.message
            rows.append(row)
        return rows

    def sizes(self) -> list[tuple[int, str]]:
        """(tokens, dtype) of the store's usable cartridges: the bank copies to compile."""
        usable = set()
        for info in self._infos().values():
            try:
                if isinstance(info, ServeError):
                    raise info
                self.check_usable(info)
            except ServeError:
                continue
            usable.add((info.tokens, info.dtype))
        return sorted(usable)

    def check_usable(self, info: CartridgeInfo) -> None:
        cfg = self.model.config
        if info.fingerprint != self.model.fingerprint:
            raise _refuse(422, f"cartridge {info.id!r} was made for model {info.fingerprint}; "
                          f"this server runs model {self.model.fingerprint}",
                          "cartridge_model_mismatch")
        want = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        if len(info.shape) != 4 or (info.shape[0], info.shape[2], info.shape[3]) != want:
            raise _refuse(422, f"cartridge {info.id!r} is shaped {list(info.shape)}, this model "
                          f"needs [layers={want[0]}, tokens, kv_heads={want[1]}, "
                          f"head_dim={want[2]}]", "cartridge_model_mismatch")
        if info.tokens > self.max_cartridge_tokens:
            raise _refuse(400, f"cartridge {info.id!r} has {info.tokens} tokens; this server's "
                          f"bank slots hold {self.max_cartridge_tokens} (--max_cartridge_tokens)",
                          "cartridge_too_long")

    def check_request(self, prompt: int, ids: list[str], max_tokens: int
                      ) -> list[CartridgeInfo]:
        """The infos of a request's cartridges, after every check that needs no device."""
        c_max = self.config.max_cartridges
        if len(ids) > c_max:
            raise _refuse(400, f"{len(ids)} cartridges requested; at most {c_max} per request "
                          f"(--max_cartridges)", "too_many_cartridges")
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise _refuse(400, f"cartridges {repeated} requested more than once; a cartridge "
                          f"is composed once", "duplicate_cartridges")
        infos = [self.info(i) for i in ids]
        for info in infos:
            self.check_usable(info)
        need = sum(i.bytes for i in infos)
        if need > self.budget.budget_bytes:
            raise _refuse(400, f"cartridges {ids} need {need} bytes on the device; the budget "
                          f"is {self.budget.budget_bytes} (--budget_bytes)", "over_budget")
        start = attention.query_start([i.tokens for i in infos], self.geometry)
        window = self.model.config.max_position_embeddings
        if prompt + start + max_tokens > window:
            raise ServeError(400, f"prompt ({prompt} tokens) + cartridges ({start} positions) + "
                             f"max_tokens ({max_tokens}) = {prompt + start + max_tokens} exceed "
                             f"the context window of {window} tokens", param="max_tokens",
                             code="context_length_exceeded")
        return infos

    def acquire(self, ids: list[str]) -> list[Cartridge]:
        """Pins `ids` (the caller holds `lock`); BudgetExceededError when the pinned ones leave
        no room, ServeError when one cannot be read."""
        try:
            return [c for c, _ in self.budget.acquire(ids)] if ids else []
        except store_lib.CartridgeNotFoundError as e:
            raise _refuse(404, self.public(str(e)), "cartridge_not_found") from None
        except (store_lib.CartridgeStoreError, CartridgeMismatchError, OSError) as e:
            raise _refuse(422, self.public(f"{type(e).__name__}: {e}" if isinstance(e, OSError)
                                           else str(e)), "cartridge_corrupt") from None

    def close(self) -> None:
        with self.lock:
            self.budget.close()


def put_slot(bank: attention.CartridgeBank, slot, keys, values) -> attention.CartridgeBank:
    """Writes one cartridge (keys/values [L, P, K, Dh], P <= P_max) into bank slot `slot`."""
    at = (slot, 0, 0, 0, 0)
    return attention.CartridgeBank(
        jax.lax.dynamic_update_slice(bank.keys, keys[None].astype(bank.keys.dtype), at),
        jax.lax.dynamic_update_slice(bank.values, values[None].astype(bank.values.dtype), at),
        bank.lengths.at[slot].set(keys.shape[1]))


put_slot_jitted = jax.jit(put_slot, donate_argnums=0)
"""`put_slot` compiled on first use by the caller's thread: the static engine's bank copies."""


class BankSlots:
    """The bank and which slot holds which pinned cartridge (module doc). Engine thread only.
    `put(tokens, dtype)` gives the compiled `put_slot` for a cartridge of that many tokens and
    dtype, or None while it compiles (the continuous engine's kernels); by default
    `put_slot_jitted` (the static engine's)."""

    def __init__(self, catalogue: Catalogue):
        self.catalogue = catalogue
        cfg, config = catalogue.model.config, catalogue.config
        p_max = catalogue.max_cartridge_tokens
        dtype = decoder_lib.kv_dtype(catalogue.model.params)
        slot_bytes = 2 * cfg.num_layers * p_max * cfg.num_kv_heads * cfg.head_dim * \
            np.dtype(dtype).itemsize
        slots = config.bank_slots or min(config.max_batch * config.max_cartridges,
                                         max(config.budget_bytes // slot_bytes, 1))
        slots = max(slots, config.max_cartridges, 1)
        if config.bank_slots and config.bank_slots < config.max_cartridges:
            raise ValueError(f"bank_slots={config.bank_slots} cannot hold the "
                             f"{config.max_cartridges} cartridges one request may use")
        shape = (slots, cfg.num_layers, p_max, cfg.num_kv_heads, cfg.head_dim)
        self.bank = jax.device_put(attention.CartridgeBank(  # made on the host: no compile
            np.zeros(shape, dtype), np.zeros(shape, dtype), np.zeros((slots,), np.int32)))
        self.put: Callable[[int, str], Callable | None] = lambda tokens, dtype: put_slot_jitted
        self._held: list[tuple[str, jax.Array] | None] = [None] * slots  # (id, keys) in a slot
        self._refs = [0] * slots

    @property
    def size(self) -> int:
        return len(self._held)

    def place(self, cartridges: dict[str, Cartridge]) -> dict[str, int] | None:
        """Holds a slot for each cartridge (copying in those not there) and returns the slot of
        each; None, holding nothing, when too few slots are free or a copy's kernel compiles."""
        slot_of = {}
        for s, held in enumerate(self._held):
            if held is not None and held[0] in cartridges and held[1] is cartridges[held[0]].keys:
                slot_of[held[0]] = s
        free = [s for s in range(self.size) if not self._refs[s] and s not in slot_of.values()]
        if len(cartridges) - len(slot_of) > len(free):
            return None
        puts = {doc_id: self.put(c.num_tokens, str(c.keys.dtype))
                for doc_id, c in cartridges.items() if doc_id not in slot_of}
        if any(fn is None for fn in puts.values()):
            return None
        with self.catalogue.lock:
            resident = set(self.catalogue.budget.resident_ids())
        free.sort(key=lambda s: self._held[s] is not None and self._held[s][0] in resident)
        free_iter = iter(free)
        for doc_id, c in cartridges.items():
            if doc_id not in slot_of:
                s = next(free_iter)
                self.bank = puts[doc_id](self.bank, np.int32(s), c.keys, c.values)
                self._held[s] = (doc_id, c.keys)
                slot_of[doc_id] = s
        for s in slot_of.values():
            self._refs[s] += 1
        return slot_of

    def release(self, slots: list[int]) -> None:
        for s in slots:
            self._refs[s] -= 1


class EngineBase:
    """What both engines set up alike: the catalogue (and the config with its geometry
    resolved), the one budget manager, the bank, the inbox, the counters, and the budget's
    figures for `status()`."""

    def __init__(self, model: LoadedModel, store: store_lib.CartridgeStore, config: ServeConfig):
        self.model = model
        self.catalogue = Catalogue(model, store, config)
        self.config = self.catalogue.config
        self.budget = self.catalogue.budget
        self.max_cartridge_tokens = self.catalogue.max_cartridge_tokens
        self.bank = BankSlots(self.catalogue)
        self._inbox: queue.Queue = queue.Queue()
        self.requests = 0  # requests finished
        self.largest_batch = 0

    def budget_status(self) -> dict:
        with self.catalogue.lock:
            return {"budget_bytes": self.budget.budget_bytes,
                    "resident_bytes": self.budget.resident_bytes,
                    "pinned_bytes": self.budget.pinned_bytes,
                    "paging": dataclasses.asdict(self.budget.stats)}
