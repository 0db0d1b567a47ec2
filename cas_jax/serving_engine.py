"""The batching engine behind `cas_jax.server`: admission, cartridge paging and batched sampling.

A request's life:
  1. `Engine.submit` (on the HTTP worker thread) renders its prompt with the project's one
     rendering, checks its cartridges against their manifests (unknown -> 404, corrupt or made
     for another model -> 422, too many / too long / over the budget or the window -> 400) and
     pins them in the `BudgetManager` (`acquire`). A cartridge whose data fails its checksum is
     refused here too. So a bad request never reaches a batch. When the cartridges of requests
     already in flight fill the budget, `submit` waits for their release (backpressure).
  2. The engine thread collects pending requests until `max_batch` are pending, or none has
     arrived for `batch_wait_ms` while no `submit` is under way (a wave of requests joins one
     batch; a request waiting for the budget is not waited for), then runs every request with
     the same sampling key (temperature, top-p, penalties, bucketed max_tokens) in ONE
     `sampling.generate` call; the rest wait for the next call. Rows with different cartridge
     sets share one fixed-shape `CartridgeBank` (`bank_slots` slots of `max_cartridge_tokens`
     tokens) and per-row selection arrays [B, max_cartridges], so a new set of cartridges
     changes array values, never shapes, and nothing recompiles. A slot keeps its cartridge
     across batches; only new arrivals are copied in. Rows without cartridges select nothing;
     a batch with none gets no prefix.
  3. When the call returns, each row is cut to its own max_tokens and stop strings, its future
     is resolved and its cartridges are released (unpinned; they stay resident until evicted).

Generation is request level: a batch runs to completion before the next starts (the sampler's
decode loop is one jitted while loop), so streaming sends the whole completion as one chunk.

The bank (a working buffer for the current batch, outside `budget_bytes`) is
bank_slots x layers x max_cartridge_tokens x kv_heads x head_dim x 2 arrays in the model dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import queue
import threading
from concurrent.futures import Future

import jax
import jax.numpy as jnp
import numpy as np

from cas_jax import attention, budget as budget_lib, cartridge_files, rendering, sampling
from cas_jax import store as store_lib
from cas_jax import tokenizer as tok_lib
from cas_jax.cartridge import Cartridge, CartridgeMismatchError
from cas_jax.loading import LoadedModel


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """budget_bytes: device bytes of resident cartridges (`BudgetManager`).
    max_batch: most rows in one `generate` call; batch_wait_ms: once a request is pending, the
      engine takes more until none arrives for this long (or max_batch are pending).
    max_cartridges: C, most cartridges per request (selection slots per row).
    max_cartridge_tokens: P_max, tokens of a bank slot; None = the largest cartridge in the
      store at start-up (128 for an empty store).
    bank_slots: cartridges in the bank (most distinct cartridges in one batch); None =
      max_batch * max_cartridges.
    default_max_tokens: completion length when a request gives none.
    model_id: the model's name in /v1/models and responses; None = the model file's name.
    geometry: how a request's cartridges are composed (`attention.Geometry`): the one they
      were trained under.
    """

    budget_bytes: int = 1 << 30
    max_batch: int = 16
    batch_wait_ms: float = 5.0
    max_cartridges: int = 4
    max_cartridge_tokens: int | None = None
    bank_slots: int | None = None
    default_max_tokens: int = 256
    model_id: str | None = None
    geometry: attention.Geometry = attention.DEFAULT_GEOMETRY


class ServeError(Exception):
    """A request the server refuses; `body()` is OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclasses.dataclass(frozen=True)
class CartridgeInfo:
    """What a cartridge's manifest says: tokens, bytes of keys + values, its model."""

    id: str
    tokens: int
    bytes: int
    fingerprint: str
    shape: tuple[int, ...]  # keys [layers, tokens, kv_heads, head_dim]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """A request's sampling parameters; requests with equal `key` share a batch."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    @property
    def key(self) -> tuple:
        top_p = self.top_p if self.temperature > 0 else 1.0  # greedy ignores top-p
        return (self.temperature, top_p, self.frequency_penalty, self.presence_penalty,
                sampling.bucket(self.max_tokens))


@dataclasses.dataclass(frozen=True)
class Completion:
    """One finished row. finish_reason: "stop" (stop token or string) or "length".
    completion_tokens counts the tokens generated (the stop token included)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cartridge_tokens: int


@dataclasses.dataclass
class _Job:
    prompt: list[int]
    cartridges: list[tuple[str, Cartridge]]  # pinned, in composition order
    sampling: Sampling
    cartridge_tokens: int  # visible prefix tokens (one sink for the set)
    future: Future


@functools.partial(jax.jit, donate_argnums=0)
def _put_slot(bank: attention.CartridgeBank, slot, keys, values) -> attention.CartridgeBank:
    """Writes one cartridge (keys/values [L, P, K, Dh], P <= P_max) into bank slot `slot`."""
    at = (slot, 0, 0, 0, 0)
    return attention.CartridgeBank(
        jax.lax.dynamic_update_slice(bank.keys, keys[None].astype(bank.keys.dtype), at),
        jax.lax.dynamic_update_slice(bank.values, values[None].astype(bank.values.dtype), at),
        bank.lengths.at[slot].set(keys.shape[1]))


_compose = jax.jit(attention.compose, static_argnames=("geometry",))


class Engine:
    """Serves chat completions for `model` from cartridges in `store` (module doc)."""

    def __init__(self, model: LoadedModel, store: store_lib.CartridgeStore,
                 config: ServeConfig = ServeConfig()):
        self.model, self.store, self.config = model, store, config
        self.rendering = rendering.rendering_for(model.tokenizer)
        self.stop_ids = tuple(tok_lib.stop_token_ids(model.tokenizer))
        self.budget = budget_lib.BudgetManager(store, config.budget_bytes)
        self._budget_cv = threading.Condition()  # guards self.budget (one thread at a time)
        self._manifests: dict[str, tuple[str, CartridgeInfo]] = {}  # id -> (version, info)
        sizes = [info.tokens for info in self._infos().values()
                 if isinstance(info, CartridgeInfo)]
        self.max_cartridge_tokens = config.max_cartridge_tokens or max(sizes, default=128)
        cfg = model.config
        slots = config.bank_slots or config.max_batch * config.max_cartridges
        if slots < config.max_cartridges:
            raise ValueError(f"bank_slots={slots} cannot hold the {config.max_cartridges} "
                             f"cartridges one request may use")
        shape = (slots, cfg.num_layers, self.max_cartridge_tokens, cfg.num_kv_heads,
                 cfg.head_dim)
        dtype = model.params["embed"].dtype
        self._bank = attention.CartridgeBank(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                                             jnp.zeros((slots,), jnp.int32))
        self._slots: list[tuple[str, jax.Array] | None] = [None] * slots  # (id, keys) held
        self._slot_used = [0] * slots  # when each slot was last used (self._placements)
        self._placements = 0
        self.batches = 0  # generate calls run
        self.rows = 0  # requests answered
        self.largest_batch = 0
        self._inbox: queue.Queue[_Job | None] = queue.Queue()
        self._admitting = 0  # submits under way, not waiting for the budget
        self._admitting_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="cas-serving-engine",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ cartridge catalogue

    def info(self, doc_id: str) -> CartridgeInfo:
        """The manifest facts of `doc_id`; ServeError 404 if unknown, 422 if unreadable."""
        try:
            directory = self.store.cartridge_dir(doc_id)
        except ValueError as e:
            raise ServeError(404, f"no cartridge {doc_id!r}: {e}", param="cartridges",
                             code="cartridge_not_found") from None
        label = f"cartridge {doc_id!r}"
        try:
            # The store's own CRC-checked manifest reader; versions are immutable, so a
            # manifest is read once per version.
            version = cartridge_files.read_current(directory, label)
            cached = self._manifests.get(doc_id)
            if cached is not None and cached[0] == version:
                return cached[1]
            manifest = cartridge_files.read_manifest(
                os.path.join(directory, version + ".json"), label)
            keys = next(a for a in manifest["arrays"] if a["name"] == "keys")
            info = CartridgeInfo(doc_id, int(keys["shape"][1]), 2 * int(keys["nbytes"]),
                                 manifest["meta"]["model_fingerprint"], tuple(keys["shape"]))
        except store_lib.CartridgeNotFoundError:
            raise ServeError(404, f"no cartridge {doc_id!r} in the store", param="cartridges",
                             code="cartridge_not_found") from None
        except (store_lib.CartridgeStoreError, KeyError, IndexError, StopIteration,
                TypeError) as e:
            raise ServeError(422, f"cartridge {doc_id!r} is unreadable: {e or type(e).__name__}",
                             param="cartridges", code="cartridge_corrupt") from None
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

    def catalogue(self) -> list[dict]:
        """Every cartridge in the store: id, tokens, bytes and resident (on the device), or the
        error that makes it unusable."""
        with self._budget_cv:
            resident = set(self.budget.resident_ids())
        rows = []
        for doc_id, info in self._infos().items():
            row = {"id": doc_id, "object": "cartridge"}
            try:
                if isinstance(info, ServeError):
                    raise info
                row.update(tokens=info.tokens, bytes=info.bytes, resident=doc_id in resident)
                self._check_usable(info)
            except ServeError as e:
                row["error"] = e.message
            rows.append(row)
        return rows

    def _check_usable(self, info: CartridgeInfo) -> None:
        cfg = self.model.config
        if info.fingerprint != self.model.fingerprint:
            raise ServeError(422, f"cartridge {info.id!r} was made for model {info.fingerprint}; "
                             f"this server runs model {self.model.fingerprint}",
                             param="cartridges", code="cartridge_model_mismatch")
        want = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        if len(info.shape) != 4 or (info.shape[0], info.shape[2], info.shape[3]) != want:
            raise ServeError(422, f"cartridge {info.id!r} is shaped {list(info.shape)}, this model "
                             f"needs [layers={want[0]}, tokens, kv_heads={want[1]}, "
                             f"head_dim={want[2]}]", param="cartridges",
                             code="cartridge_model_mismatch")
        if info.tokens > self.max_cartridge_tokens:
            raise ServeError(400, f"cartridge {info.id!r} has {info.tokens} tokens; this server's "
                             f"bank slots hold {self.max_cartridge_tokens} "
                             f"(--max_cartridge_tokens)", param="cartridges",
                             code="cartridge_too_long")

    # ------------------------------------------------------------------ admission

    def prompt_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt: an optional leading system message's content as the document block,
        then the rest as the conversation (`cas_jax.rendering`)."""
        doc = None
        if messages and messages[0]["role"] == "system":
            doc, messages = messages[0]["content"], messages[1:]
        if any(m["role"] == "system" for m in messages):
            raise ServeError(400, "only the first message may be a system message; its text is "
                             "rendered as the document block (cartridges take the same place)",
                             param="messages")
        if not messages:
            raise ServeError(400, "messages need a user or assistant turn", param="messages")
        try:
            return self.rendering.prompt(doc, messages)
        except ValueError as e:
            raise ServeError(400, str(e), param="messages") from None

    def submit(self, messages: list[dict[str, str]], cartridge_ids: list[str],
               params: Sampling) -> Future:
        """Validates a request, pins its cartridges and queues it; a Future of its Completion.
        Raises ServeError for a request the server refuses (nothing is pinned then)."""
        self._admitting_delta(1)
        try:
            return self._admit(messages, cartridge_ids, params)
        finally:
            self._admitting_delta(-1)

    def _admitting_delta(self, d: int) -> None:
        with self._admitting_lock:
            self._admitting += d

    def _admit(self, messages: list[dict[str, str]], cartridge_ids: list[str],
               params: Sampling) -> Future:
        prompt = self.prompt_tokens(messages)
        c_max = self.config.max_cartridges
        if len(cartridge_ids) > c_max:
            raise ServeError(400, f"{len(cartridge_ids)} cartridges requested; at most {c_max} "
                             f"per request (--max_cartridges)", param="cartridges",
                             code="too_many_cartridges")
        infos = [self.info(i) for i in cartridge_ids]
        for info in infos:
            self._check_usable(info)
        need = sum({i.id: i.bytes for i in infos}.values())
        if need > self.budget.budget_bytes:
            raise ServeError(400, f"cartridges {cartridge_ids} need {need} bytes on the device; "
                             f"the budget is {self.budget.budget_bytes} (--budget_bytes)",
                             param="cartridges", code="over_budget")
        n_prefix = attention.visible_tokens([i.tokens for i in infos])
        start = attention.query_start([i.tokens for i in infos], self.config.geometry)
        self._check_window(len(prompt), start, params.max_tokens, bool(infos))
        cartridges = list(zip(cartridge_ids, self._acquire(cartridge_ids)))
        job = _Job(prompt, cartridges, params, n_prefix, Future())
        self._inbox.put(job)
        return job.future

    def _prefix_width(self, with_cartridges: bool) -> int:
        return self.config.max_cartridges * self.max_cartridge_tokens if with_cartridges else 0

    def _check_window(self, prompt: int, start: int, max_tokens: int,
                      with_cartridges: bool) -> None:
        window = self.model.config.max_position_embeddings
        if prompt + start + max_tokens > window:
            raise ServeError(400, f"prompt ({prompt} tokens) + cartridges ({start} positions) + "
                             f"max_tokens ({max_tokens}) = {prompt + start + max_tokens} "
                             f"exceed the context window of {window} tokens",
                             param="max_tokens", code="context_length_exceeded")
        # What `sampling.generate` allocates: bucketed prompt and output, every prefix slot.
        padded = (sampling.bucket(prompt) + sampling.bucket(max_tokens)
                  + self._prefix_width(with_cartridges))
        if padded > window:
            raise ServeError(400, f"prompt ({prompt} tokens, padded to {sampling.bucket(prompt)}) "
                             f"+ max_tokens ({max_tokens}, padded to "
                             f"{sampling.bucket(max_tokens)}) + cartridge slots "
                             f"({self._prefix_width(with_cartridges)}) = {padded} exceed the "
                             f"context window of {window} tokens; lower max_tokens",
                             param="max_tokens", code="context_length_exceeded")

    def _acquire(self, ids: list[str]) -> list[Cartridge]:
        """Pins `ids`, waiting while cartridges in flight fill the budget."""
        if not ids:
            return []
        with self._budget_cv:
            while True:
                try:
                    return [c for c, _ in self.budget.acquire(ids)]
                except budget_lib.BudgetExceededError:
                    if not self.budget.pinned_bytes:
                        raise
                    self._admitting_delta(-1)  # the engine must not wait for this one
                    self._budget_cv.wait()
                    self._admitting_delta(1)
                except store_lib.CartridgeNotFoundError as e:
                    raise ServeError(404, str(e), param="cartridges",
                                     code="cartridge_not_found") from None
                except (store_lib.CartridgeStoreError, CartridgeMismatchError) as e:
                    raise ServeError(422, str(e), param="cartridges",
                                     code="cartridge_corrupt") from None

    def _release(self, jobs: list[_Job]) -> None:
        with self._budget_cv:
            for job in jobs:
                self.budget.release([doc_id for doc_id, _ in job.cartridges])
            self._budget_cv.notify_all()

    # ------------------------------------------------------------------ the engine thread

    def _loop(self) -> None:
        pending: list[_Job] = []
        closing = False
        while pending or not closing:
            if not pending:
                job = self._inbox.get()
                if job is None:
                    closing = True
                    continue
                pending.append(job)
            while not closing and len(pending) < self.config.max_batch:
                try:
                    job = self._inbox.get(timeout=self.config.batch_wait_ms / 1000)
                except queue.Empty:
                    if self._admitting:  # those requests are about to arrive
                        continue
                    break
                if job is None:
                    closing = True
                else:
                    pending.append(job)
            batch, pending = self._take_batch(pending)
            self._run(batch)

    def _fits(self, jobs: list[_Job]) -> bool:
        distinct = {doc_id for j in jobs for doc_id, _ in j.cartridges}
        padded = (sampling.bucket(max(len(j.prompt) for j in jobs))
                  + sampling.bucket(max(j.sampling.max_tokens for j in jobs))
                  + self._prefix_width(bool(distinct)))
        window = self.model.config.max_position_embeddings
        return len(distinct) <= len(self._slots) and padded <= window

    def _take_batch(self, pending: list[_Job]) -> tuple[list[_Job], list[_Job]]:
        """(the oldest job with every later one that shares its sampling key and fits, the rest).
        The oldest always fits: `submit` checked it alone."""
        key = pending[0].sampling.key
        batch, rest = pending[:1], []
        for job in pending[1:]:
            if (len(batch) < self.config.max_batch and job.sampling.key == key
                    and self._fits(batch + [job])):
                batch.append(job)
            else:
                rest.append(job)
        return batch, rest

    def _run(self, batch: list[_Job]) -> None:
        try:
            prefix = self._prefix(batch)
            s = batch[0].sampling
            params = sampling.SamplingParams(
                max_new_tokens=max(j.sampling.max_tokens for j in batch),
                temperature=s.temperature, top_p=s.top_p, stop_ids=self.stop_ids,
                frequency_penalty=s.frequency_penalty, presence_penalty=s.presence_penalty)
            outs = sampling.generate(self.model.params, self.model.config,
                                     [j.prompt for j in batch], params, prefix=prefix,
                                     seed=self.batches)
            self.batches += 1
            self.rows += len(batch)
            self.largest_batch = max(self.largest_batch, len(batch))
            for job, out in zip(batch, outs):
                job.future.set_result(self._finish(job, out))
        except Exception as e:  # a failed batch fails its requests, not the server
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e)
        finally:
            self._release(batch)

    def _prefix(self, batch: list[_Job]) -> dict | None:
        """The composed prefix {k, v: [L, B_pad, C*P_max, K, Dh], mask} or None; rows past the
        batch repeat its last row, as `sampling.generate` pads."""
        if not any(j.cartridges for j in batch):
            return None
        slots = self._place({doc_id: c for j in batch for doc_id, c in j.cartridges})
        b_pad = sampling.bucket(len(batch), minimum=1)
        selection = np.zeros((b_pad, self.config.max_cartridges), np.int32)
        selected = np.zeros(selection.shape, bool)
        for i in range(b_pad):
            job = batch[min(i, len(batch) - 1)]
            for c, (doc_id, _) in enumerate(job.cartridges):
                selection[i, c], selected[i, c] = slots[doc_id], True
        return _compose(self._bank, jnp.asarray(selection), jnp.asarray(selected),
                        geometry=self.config.geometry)

    def _place(self, cartridges: dict[str, Cartridge]) -> dict[str, int]:
        """Bank slot of each cartridge; copies in those not already held (into the least
        recently used slots that this batch does not need)."""
        self._placements += 1
        slot_of = {}
        for s, held in enumerate(self._slots):
            if held is not None and held[0] in cartridges and held[1] is cartridges[held[0]].keys:
                slot_of[held[0]] = s
        taken = set(slot_of.values())
        free = iter(sorted((s for s in range(len(self._slots)) if s not in taken),
                           key=self._slot_used.__getitem__))
        for doc_id, c in cartridges.items():
            if doc_id not in slot_of:
                s = next(free)
                self._bank = _put_slot(self._bank, jnp.int32(s), c.keys, c.values)
                self._slots[s] = (doc_id, c.keys)
                slot_of[doc_id] = s
        for s in slot_of.values():
            self._slot_used[s] = self._placements
        return slot_of

    def _finish(self, job: _Job, tokens: list[int]) -> Completion:
        tokens = tokens[:job.sampling.max_tokens]
        stopped = bool(tokens) and tokens[-1] in self.stop_ids
        text = self.model.tokenizer.decode(tokens, skip_special_tokens=True)
        cuts = [text.find(s) for s in job.sampling.stop if s in text]
        if cuts:
            text, stopped = text[:min(cuts)], True
        return Completion(text, "stop" if stopped else "length", len(job.prompt), len(tokens),
                          job.cartridge_tokens)

    # ------------------------------------------------------------------ status

    def status(self) -> dict:
        with self._budget_cv:
            return {"queued": self._inbox.qsize(), "batches": self.batches, "rows": self.rows,
                    "largest_batch": self.largest_batch,
                    "budget_bytes": self.budget.budget_bytes,
                    "resident_bytes": self.budget.resident_bytes,
                    "pinned_bytes": self.budget.pinned_bytes,
                    "paging": dataclasses.asdict(self.budget.stats)}

    def close(self) -> None:
        """Answers the requests already queued, stops the engine thread, closes the budget."""
        self._inbox.put(None)
        self._thread.join()
        with self._budget_cv:
            self.budget.close()
