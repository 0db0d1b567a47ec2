"""Budget manager: pages cartridges and their optimizer state between a store and devices.

The store is any `store.BackingStore` (load and save by id): a `CartridgeStore`, or the
collection trainer's `pending_store.PendingStore`.

At most `budget_bytes` of cartridge K/V plus optimizer-state arrays are held on the device(s) at
any time (bytes of the logical arrays: under a replicated sharding each device holds a copy).

  acquire(ids)  pins `ids` and returns their device (Cartridge, opt_state); a missing one is taken
                from the prefetch staging area or read from the store, after evicting least
                recently used unpinned cartridges until it fits
  update(...)   replaces a pinned cartridge's device copy and marks it dirty
  release(ids)  unpins
  prefetch(ids) reads the next step's cartridges from the store into host memory on a background
                thread while the current step computes, and evicts ahead (LRU, unpinned, not
                in `ids`) to make room for them, so offloads overlap the step too
  flush()       writes every dirty cartridge back to the store (call at checkpoints)

Evicting a dirty cartridge hands its device arrays to an offload thread, which copies them to
host memory and deletes them (their bytes count against the budget until then); a writer thread
then saves the host copy to the store. Until that save lands, a re-acquire is served from the
host copy, so a reloaded cartridge is bitwise the one evicted. Evicted device arrays are deleted:
arrays returned by `acquire` are valid until the id is released and then evicted.

Threads: public methods are meant for one thread (the training loop). The reader, offload and
writer threads share only the write-back table, byte counters, futures and stats, under a lock.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable

import jax
import numpy as np

from cas_jax.cartridges.cartridge import Cartridge
from cas_jax.cartridges.store import BackingStore, CartridgeStoreError, OptTemplate


class BudgetExceededError(RuntimeError):
    """The cartridges that must be resident at once (pinned plus requested) exceed the budget."""


@dataclasses.dataclass
class PagingStats:
    """Counters since construction; bytes count cartridge plus optimizer-state arrays."""

    hits: int = 0  # acquired ids already resident on the device
    prefetch_hits: int = 0  # acquired ids staged by prefetch (read finished or still in flight)
    misses: int = 0  # acquired ids read inside acquire (from the store, or a pending write-back)
    evictions: int = 0
    bytes_read: int = 0  # read from the store, by acquire or prefetch
    read_s: float = 0.0  # seconds spent in those reads, on whichever thread
    bytes_in: int = 0  # put on the device by acquire
    device_put_s: float = 0.0  # seconds spent in those transfers (waited to completion)
    offload_s: float = 0.0  # seconds copying evicted dirty cartridges to host (offload thread)
    bytes_written: int = 0  # dirty cartridges written back to the store
    write_s: float = 0.0  # seconds spent in those writes (writer thread)
    acquire_wait_s: float = 0.0  # seconds the caller was blocked in acquire (I/O, transfers)
    flush_s: float = 0.0  # seconds the caller was blocked in flush


@dataclasses.dataclass
class _HostCopy:
    """A cartridge and its optimizer state as host numpy arrays."""

    cartridge: Cartridge
    opt_state: Any
    step: int
    nbytes: int


@dataclasses.dataclass
class _Resident:
    cartridge: Cartridge
    opt_state: Any
    step: int
    nbytes: int
    pins: int = 0
    dirty: bool = False


@dataclasses.dataclass(eq=False)
class _WriteBack:
    """An evicted dirty cartridge on its way to the store: on the device until `copied` is set,
    then in `host` (None if the copy failed)."""

    device: tuple[Cartridge, Any] | None
    step: int
    nbytes: int
    host: _HostCopy | None = None
    copied: threading.Event = dataclasses.field(default_factory=threading.Event)


def _host_copy(tree: Any) -> Any:
    """Host numpy copies of a pytree of device arrays (owning their memory: on CPU a fetched
    array may alias the device buffer, which eviction deletes)."""
    return jax.tree.map(np.copy, jax.device_get(tree))


def _tree_nbytes(tree: Any) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def _delete(tree: Any) -> None:
    for x in jax.tree.leaves(tree):
        x.delete()


class BudgetManager:
    """Keeps at most `budget_bytes` of cartridges plus optimizer state on the device(s).

    store: where cartridges are read from and written back to (`store.BackingStore`).
    opt_template: how to restore each cartridge's optimizer state (see `CartridgeStore.load`),
      e.g. `store.cached_opt_template(optimizer.init)`; None pages cartridges alone (their
      optimizer state is not read, and a write-back stores what `update` was given).
    sharding: where `jax.device_put` puts every array; None means the default device.
    io_threads: threads reading prefetched cartridges from the store.
    max_pending_write_bytes: host bytes of evicted dirty cartridges that may wait for the writer
      before `acquire` blocks on it (default: `budget_bytes`).
    """

    def __init__(self, store: BackingStore, budget_bytes: int, opt_template: OptTemplate = None,
                 sharding: jax.sharding.Sharding | None = None, io_threads: int = 1,
                 max_pending_write_bytes: int | None = None):
        self.store = store
        self.budget_bytes = int(budget_bytes)
        self.opt_template = opt_template
        self.sharding = sharding
        self.max_pending_write_bytes = (self.budget_bytes if max_pending_write_bytes is None
                                        else int(max_pending_write_bytes))
        self._resident: collections.OrderedDict[str, _Resident] = collections.OrderedDict()
        self._resident_bytes = 0  # device bytes of the entries in _resident
        self._sizes: dict[str, int] = {}  # bytes of each cartridge when last resident
        self._staged: dict[str, Future] = {}
        self._reader = ThreadPoolExecutor(io_threads, thread_name_prefix="cartridge-read")
        self._offloader = ThreadPoolExecutor(1, thread_name_prefix="cartridge-offload")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="cartridge-write")
        # Shared with the background threads, under _lock.
        self._lock = threading.Lock()
        self._write_backs: dict[str, _WriteBack] = {}  # evicted dirty ids not yet in the store
        self._offloading_bytes = 0  # device bytes of evicted cartridges not yet deleted
        self._offloads: collections.deque[Future] = collections.deque()
        self._writes: collections.deque[Future] = collections.deque()
        self._stats = PagingStats()

    # ------------------------------------------------------------------ introspection

    @property
    def resident_bytes(self) -> int:
        """Device bytes held: resident cartridges plus evicted ones still being copied off."""
        with self._lock:
            return self._resident_bytes + self._offloading_bytes

    @property
    def pinned_bytes(self) -> int:
        return sum(e.nbytes for e in self._resident.values() if e.pins)

    def resident_ids(self) -> list[str]:
        """Resident ids, least recently used first."""
        return list(self._resident)

    @property
    def stats(self) -> PagingStats:
        with self._lock:
            return dataclasses.replace(self._stats)

    # ------------------------------------------------------------------ background work

    def _read_host(self, doc_id: str) -> _HostCopy:
        """The newest copy of `doc_id` on the host: a pending write-back's, else the store's."""
        with self._lock:
            pending = self._write_backs.get(doc_id)
        if pending is not None:
            pending.copied.wait()
            if pending.host is None:
                raise CartridgeStoreError(
                    f"cartridge {doc_id!r}: copying it off the device for write-back failed")
            return pending.host
        t0 = time.perf_counter()
        cartridge, opt_state, step = self.store.load(
            doc_id, self.opt_template, read_opt_state=self.opt_template is not None)
        host = _HostCopy(cartridge, opt_state, step, cartridge.nbytes + _tree_nbytes(opt_state))
        with self._lock:
            self._stats.bytes_read += host.nbytes
            self._stats.read_s += time.perf_counter() - t0
        return host

    def _offload(self, doc_id: str, wb: _WriteBack) -> None:
        """Copies an evicted cartridge to host, frees its device arrays, queues its write."""
        t0 = time.perf_counter()
        try:
            cartridge, opt_state = _host_copy(wb.device)
            wb.host = _HostCopy(cartridge, opt_state, wb.step, wb.nbytes)
            _delete(wb.device)
        finally:
            with self._lock:
                wb.device = None
                self._offloading_bytes -= wb.nbytes
                self._stats.offload_s += time.perf_counter() - t0
                if wb.host is not None:
                    self._writes.append(self._writer.submit(self._write_back, doc_id, wb))
            wb.copied.set()

    def _write_back(self, doc_id: str, wb: _WriteBack) -> None:
        t0 = time.perf_counter()
        self.store.save(doc_id, wb.host.cartridge, wb.host.opt_state, wb.host.step)
        with self._lock:
            self._stats.bytes_written += wb.nbytes
            self._stats.write_s += time.perf_counter() - t0
            if self._write_backs.get(doc_id) is wb:
                del self._write_backs[doc_id]

    def _reap(self, block: bool) -> None:
        """Drops finished offloads and writes (all of them if `block`); re-raises a failure."""
        for queue in (self._offloads, self._writes):  # Offloads first: they queue writes.
            while True:
                with self._lock:
                    if not queue or not (block or queue[0].done()):
                        break
                    fut = queue.popleft()
                fut.result()

    # ------------------------------------------------------------------ paging

    def prefetch(self, ids: Iterable[str]) -> None:
        """Starts reading `ids` into host memory; replaces the previous prefetch request.

        Staged copies from an earlier request that are not in `ids` are dropped. A failed read
        surfaces when the id is acquired.
        """
        ids = list(dict.fromkeys(ids))
        wanted = set(ids)
        for doc_id in [i for i in self._staged if i not in wanted]:
            self._staged.pop(doc_id).cancel()
        for doc_id in ids:
            if doc_id not in self._resident and doc_id not in self._staged:
                self._staged[doc_id] = self._reader.submit(self._read_host, doc_id)
        self._evict_ahead([i for i in ids if i not in self._resident], keep=wanted)

    def _evict_ahead(self, incoming: list[str], keep: set[str]) -> None:
        """Evicts least recently used unpinned cartridges (not in `keep`) so that `incoming`
        fits without waiting, sized as last seen (else as the mean resident cartridge). Their
        copy off the device and write-back then overlap the current step instead of stalling
        the next acquire. Never waits; `acquire` still makes exact room."""
        if not incoming or not self._resident:
            return
        mean = self._resident_bytes // len(self._resident)
        need = sum(self._sizes.get(i, mean) for i in incoming)
        for doc_id in [i for i, e in self._resident.items() if not e.pins and i not in keep]:
            if self.resident_bytes + need <= self.budget_bytes:
                break
            self._evict(doc_id)

    def _to_device(self, host: _HostCopy) -> tuple[Cartridge, Any]:
        t0 = time.perf_counter()
        cartridge, opt_state = jax.block_until_ready(
            jax.device_put((host.cartridge, host.opt_state), self.sharding))
        with self._lock:
            self._stats.bytes_in += host.nbytes
            self._stats.device_put_s += time.perf_counter() - t0
        return cartridge, opt_state

    def _make_room(self, nbytes: int, what: str) -> None:
        """Evicts least recently used unpinned cartridges until `nbytes` more fit the budget."""
        if self.pinned_bytes + nbytes > self.budget_bytes:
            raise BudgetExceededError(
                f"{what} need {nbytes} bytes on top of {self.pinned_bytes} pinned bytes, "
                f"over the budget of {self.budget_bytes} bytes; release cartridges or raise "
                f"the budget")
        for doc_id in [i for i, e in self._resident.items() if not e.pins]:
            if self.resident_bytes + nbytes <= self.budget_bytes:
                break
            self._evict(doc_id)
        while self.resident_bytes + nbytes > self.budget_bytes:
            with self._lock:  # The rest of the room is being copied off the device.
                offloads = list(self._offloads)
            concurrent.futures.wait(offloads, return_when=concurrent.futures.FIRST_COMPLETED)
            self._reap(block=False)

    def _evict(self, doc_id: str) -> None:
        e = self._resident.pop(doc_id)
        self._resident_bytes -= e.nbytes
        if not e.dirty:
            _delete((e.cartridge, e.opt_state))
        else:
            wb = _WriteBack((e.cartridge, e.opt_state), e.step, e.nbytes)
            with self._lock:
                self._write_backs[doc_id] = wb
                self._offloading_bytes += e.nbytes
                self._offloads.append(self._offloader.submit(self._offload, doc_id, wb))
        with self._lock:
            self._stats.evictions += 1
        while True:  # Bound the host memory of write-backs waiting for the writer.
            with self._lock:
                pending = sum(wb.nbytes for wb in self._write_backs.values())
                oldest = self._writes[0] if self._writes else None
            if oldest is None or pending <= self.max_pending_write_bytes:
                break
            concurrent.futures.wait([oldest])
            self._reap(block=False)

    def acquire(self, ids: Iterable[str]) -> list[tuple[Cartridge, Any]]:
        """Pins `ids` (each once per call) and returns their device (Cartridge, opt_state).

        Raises BudgetExceededError if the pinned cartridges plus `ids` exceed the budget, and the
        store's error naming the cartridge if one cannot be read; either way no pin is taken.
        """
        ids = list(ids)
        t0 = time.perf_counter()
        pinned: list[str] = []
        try:
            self._reap(block=False)
            sources: dict[str, Future | None] = {}
            hits = 0
            for doc_id in dict.fromkeys(ids):
                e = self._resident.get(doc_id)
                if e is not None:
                    e.pins += 1
                    pinned.append(doc_id)
                    self._resident.move_to_end(doc_id)
                    hits += 1
                else:
                    sources[doc_id] = self._staged.pop(doc_id, None)
            hosts = {doc_id: fut.result() if fut is not None else self._read_host(doc_id)
                     for doc_id, fut in sources.items()}
            self._make_room(sum(h.nbytes for h in hosts.values()), f"cartridges {list(hosts)}")
            for doc_id, host in hosts.items():
                cartridge, opt_state = self._to_device(host)
                self._resident[doc_id] = _Resident(cartridge, opt_state, host.step, host.nbytes,
                                                   pins=1)
                self._sizes[doc_id] = host.nbytes
                self._resident_bytes += host.nbytes
                pinned.append(doc_id)
            with self._lock:
                self._stats.hits += hits
                self._stats.prefetch_hits += sum(f is not None for f in sources.values())
                self._stats.misses += sum(f is None for f in sources.values())
        except BaseException:
            for doc_id in pinned:
                self._resident[doc_id].pins -= 1
            raise
        finally:
            with self._lock:
                self._stats.acquire_wait_s += time.perf_counter() - t0
        return [(self._resident[i].cartridge, self._resident[i].opt_state) for i in ids]

    def update(self, doc_id: str, cartridge: Cartridge, opt_state: Any = None,
               step: int | None = None) -> None:
        """Replaces pinned `doc_id`'s device copy and marks it dirty.

        `step` is the cartridge's training step to store with it (default: previous step + 1).
        """
        e = self._resident.get(doc_id)
        if e is None or not e.pins:
            raise ValueError(f"cartridge {doc_id!r} is not acquired; acquire it before update")
        cartridge, opt_state = jax.device_put((cartridge, opt_state), self.sharding)
        nbytes = cartridge.nbytes + _tree_nbytes(opt_state)
        if nbytes > e.nbytes:
            self._make_room(nbytes - e.nbytes, f"the update of cartridge {doc_id!r}")
        self._resident_bytes += nbytes - e.nbytes
        self._sizes[doc_id] = nbytes
        e.cartridge, e.opt_state, e.nbytes, e.dirty = cartridge, opt_state, nbytes, True
        e.step = e.step + 1 if step is None else int(step)

    def release(self, ids: Iterable[str]) -> None:
        """Unpins `ids` (each once); they stay resident until evicted."""
        for doc_id in dict.fromkeys(ids):
            e = self._resident.get(doc_id)
            if e is None or not e.pins:
                raise ValueError(f"cartridge {doc_id!r} is not acquired; cannot release it")
            e.pins -= 1

    def flush(self) -> None:
        """Writes every dirty resident cartridge to the store and waits for all write-backs and
        for the prefetch reads in flight, so that the store may change under no reader."""
        t0 = time.perf_counter()
        concurrent.futures.wait(list(self._staged.values()))
        for doc_id, e in self._resident.items():
            if e.dirty:
                cartridge, opt_state = _host_copy((e.cartridge, e.opt_state))
                wb = _WriteBack(None, e.step, e.nbytes,
                                host=_HostCopy(cartridge, opt_state, e.step, e.nbytes))
                with self._lock:
                    self._writes.append(self._writer.submit(self._write_back, doc_id, wb))
                e.dirty = False
        self._reap(block=True)
        with self._lock:
            self._stats.flush_s += time.perf_counter() - t0

    def close(self) -> None:
        """Flushes, then stops the background threads."""
        self.flush()
        for fut in self._staged.values():
            fut.cancel()
        self._staged.clear()
        for pool in (self._reader, self._offloader, self._writer):
            pool.shutdown(wait=True)

    def __enter__(self) -> "BudgetManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
