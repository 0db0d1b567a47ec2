"""The continuous-batching engine: requests join the running batch at the next decode step
and leave when they finish.

The pool (`serving_kernels`) has R rows x S KV slots per row, both bucketed (rows: powers of
two up to max_batch; slots: powers of two from min_cache_tokens, capped by the window and
max_cache_tokens), so the kernels compile once per bucket, on a background thread: a request
whose shapes are not compiled yet waits while the running rows keep decoding. Between two
decode steps the engine thread
  1. drops cancelled requests (their rows, bank slots and pins are freed at once);
  2. admits waiting requests in order (FIFO), up to prefill_tokens_per_step prompt tokens: pins
     the request's cartridges in the budget manager (it waits while pinned cartridges fill the
     budget), holds their bank slots, composes its prefix with `attention.compose` under
     `ServeConfig.geometry`, prefills its prompt at positions from `attention.query_start`
     (exactly the layout of training, scoring and `sampling.generate`), samples its first
     token and writes its K/V into a free row, growing the pool when no row is free;
  3. runs one decode step of every row: per-row temperature, top-p, penalties and seed;
  4. hands each row's token to its detokeniser and stop-string matcher, emits the text made
     final, and finishes rows on a stop token, a stop string or max_tokens;
  5. shrinks the pool when a quarter of it would do (and drops it when idle).

Ring slots: every row writes its decode step's K/V at one shared slot, the pointer, which
advances by one per step (modulo S). A request admitted at pointer p with T prompt tokens and
max_tokens m writes its decode steps at p .. p+m-2 and its prompt after them, so it needs
T + m - 1 slots of its row and never overwrites its own keys.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import secrets
import threading

import jax
import numpy as np

from cas_jax import attention, budget as budget_lib, tokenizer as tok_lib
from cas_jax.loading import LoadedModel
from cas_jax.serving_cartridges import BankSlots, Catalogue, CartridgeInfo
from cas_jax.serving_engine import Completion, Delta, Handle, Listener, Sampling, ServeConfig
from cas_jax.serving_engine import ServeError, cancelled
from cas_jax.serving_kernels import CHUNK, Kernels, row_arrays, rows_tuple
from cas_jax.serving_text import Detokenizer, StopText, TokenLogprob
from cas_jax.store import CartridgeStore

_WAKE, _CLOSE = "wake", "close"


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclasses.dataclass(eq=False)
class _Job:
    """A request, waiting or holding a row."""

    prompt: list[int]
    infos: list[CartridgeInfo]
    params: Sampling
    handle: Handle
    seed: int
    start: int  # first query position (attention.query_start)
    need: int  # KV slots of its row: prompt + max_tokens - 1
    row: int = -1
    slots: list[int] = dataclasses.field(default_factory=list)  # its ring slots, oldest first
    bank_slots: list[int] = dataclasses.field(default_factory=list)
    pinned: bool = False  # its cartridges are pinned and its bank slots held
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: list[str] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    detok: Detokenizer | None = None
    stops: StopText | None = None
    joined_step: int = -1

    @property
    def ids(self) -> list[str]:
        return [i.id for i in self.infos]


@dataclasses.dataclass
class _Pool:
    rows: int
    slots: int
    prefixed: bool
    cache: dict
    prefix: dict | None
    counts: jax.Array
    pointer: int = 0

    @property
    def shape(self) -> tuple[int, int, bool]:
        return self.rows, self.slots, self.prefixed


class ContinuousEngine:
    """Serves chat completions for `model` from cartridges in `store` (module doc)."""

    def __init__(self, model: LoadedModel, store: CartridgeStore,
                 config: ServeConfig = ServeConfig()):
        self.model, self.config = model, config
        self.catalogue = Catalogue(model, store, config)
        self.budget = self.catalogue.budget
        self.max_cartridge_tokens = self.catalogue.max_cartridge_tokens
        self.bank = BankSlots(self.catalogue)
        self.stop_ids = frozenset(tok_lib.stop_token_ids(model.tokenizer))
        window = model.config.max_position_embeddings
        self.max_cache_tokens = config.max_cache_tokens or max(window, config.max_batch * 1024)
        self.slot_cap = min(-(-window // CHUNK) * CHUNK, self.max_cache_tokens)
        self.prompt_cap = -(-window // CHUNK) * CHUNK
        self._inbox: queue.Queue = queue.Queue()
        self.kernels = Kernels(model, self.bank.bank, config.max_cartridges, config.geometry,
                               on_ready=lambda: self._inbox.put(_WAKE))
        c = max(config.max_cartridges, 1)
        self._no_cartridges = self.kernels.compose(
            self.bank.bank, np.zeros((1, c), np.int32), np.zeros((1, c), bool),
            geometry=config.geometry)
        self._pool: _Pool | None = None
        self._rows: list[_Job | None] = []
        self._waiting: collections.deque[_Job] = collections.deque()
        self.steps = 0  # decode steps run
        self.requests = 0  # requests finished
        self.largest_batch = 0
        self._lock = threading.Lock()  # guards the counters read by status()
        if config.warmup:
            self.kernels.warm(self._warm_keys())
        self._thread = threading.Thread(target=self._loop, name="cas-serving-engine",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ shapes

    def row_bucket(self, n: int) -> int:
        return min(_pow2(n), self.config.max_batch)

    def slot_bucket(self, need: int) -> int:
        return min(max(_pow2(need), self.config.min_cache_tokens), self.slot_cap)

    def prompt_bucket(self, n: int) -> int:
        return min(max(_pow2(n), 16), self.prompt_cap)

    def _warm_keys(self) -> list[tuple]:
        """The shapes of short prompts answered at default_max_tokens: every row bucket, its
        growth, its shrinking and its change to a pool with prefixes."""
        s = self.slot_bucket(64 + self.config.default_max_tokens)
        prefixes = (False, True) if self.config.max_cartridges else (False,)
        keys = [("prefill", t, p) for t in (16, 32, 64) for p in prefixes]
        r = 1
        while True:
            keys.append(("insert", r, s))
            for p in prefixes:
                keys += [("step", r, s, p), ("reset", r, s, p)]
                if p:
                    keys.append(("relayout", (r, s, False), (r, s, True)))
                if r >= 4:
                    keys.append(("relayout", (r, s, p), (self.row_bucket(r // 4), s, p)))
            if r >= self.config.max_batch:
                return keys
            nxt = self.row_bucket(r + 1)
            keys += [("relayout", (r, s, p), (nxt, s, q)) for p in prefixes for q in prefixes
                     if q >= p]
            r = nxt

    # ------------------------------------------------------------------ requests

    def submit(self, prompt: list[int], cartridge_ids: list[str], params: Sampling,
               listener: Listener | None = None) -> Handle:
        """Checks a request and queues it; its Handle (module doc of `serving_engine`).
        Raises ServeError for a request the server refuses."""
        if not prompt:
            raise ServeError(400, "the prompt is empty", param="messages")
        infos = self.catalogue.check_request(len(prompt), list(cartridge_ids),
                                             params.max_tokens)
        need = len(prompt) + params.max_tokens - 1
        if need > self.slot_cap:
            raise ServeError(400, f"prompt ({len(prompt)} tokens) + max_tokens "
                             f"({params.max_tokens}) need {need} KV slots; a row holds at most "
                             f"{self.slot_cap} (--max_cache_tokens)", param="max_tokens",
                             code="context_length_exceeded")
        start = attention.query_start([i.tokens for i in infos], self.config.geometry)
        seed = secrets.randbits(32) if params.seed is None else params.seed % (1 << 32)
        job = _Job(list(prompt), infos, params, Handle(listener), seed, start, need)
        self._inbox.put(job)
        return job.handle

    # ------------------------------------------------------------------ the engine thread

    def _loop(self) -> None:
        closing = False
        while not closing:
            live = any(self._rows)
            try:
                item = self._inbox.get(block=not live,
                                       timeout=0.05 if self._waiting and not live else None)
            except queue.Empty:
                item = None
            while item is not None:
                if item is _CLOSE:
                    closing = True
                elif isinstance(item, _Job):
                    self._waiting.append(item)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = None
            if closing:
                break
            try:
                self._drop_cancelled()
                self._admit()
                if any(self._rows):
                    self._step()
                self._shrink()
            except Exception as e:  # a failed step fails its requests, not the server
                self._fail_all(e)
        self._fail_all(ServeError(503, "the server is shutting down", type="server_error"))

    def _fail_all(self, error: Exception) -> None:
        for job in [j for j in self._rows if j is not None] + list(self._waiting):
            self._end(job)
            job.handle.emit("error", error)
        self._waiting.clear()
        self._pool = None

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._waiting if j.handle.cancelled]:
            self._waiting.remove(job)
            job.handle.emit("error", cancelled())
        for job in self._rows:
            if job is not None and job.handle.cancelled:
                self._end(job)
                job.handle.emit("error", cancelled())

    def _end(self, job: _Job) -> None:
        """Frees the row, bank slots and pins a job holds."""
        if job.row >= 0:
            self._rows[job.row] = None
            job.row = -1
        if job.pinned:
            self.bank.release(job.bank_slots)
            with self.catalogue.lock:
                self.budget.release(job.ids)
            job.pinned = False
        with self._lock:
            self.requests += 1

    # ------------------------------------------------------------------ admission

    def _admit(self) -> None:
        used = 0
        while self._waiting and used < self.config.prefill_tokens_per_step:
            job = self._waiting[0]
            try:
                admitted = self._try_admit(job)
            except ServeError as e:
                self._waiting.popleft()
                job.handle.emit("error", e)
                continue
            if not admitted:
                return
            self._waiting.popleft()
            used += len(job.prompt)

    def _target(self, job: _Job) -> tuple[int, int, bool] | None:
        """The pool shape that holds the live rows and `job`; None while it must wait."""
        live = sum(j is not None for j in self._rows)
        slots = self.slot_bucket(job.need)
        if self._pool is None:
            return self.row_bucket(1), slots, bool(job.infos)
        rows, cur_slots, prefixed = self._pool.shape
        if live == len(self._rows):
            if live >= self.config.max_batch:
                return None
            rows = self.row_bucket(live + 1)
        shape = (rows, max(cur_slots, slots), prefixed or bool(job.infos))
        return shape if shape[0] * shape[1] <= self.max_cache_tokens else None

    def _kernels(self, keys: list[tuple]) -> list | None:
        """The compiled kernels of `keys`, or None while one is still compiling."""
        try:
            kernels = [self.kernels.get(k) for k in keys]
        except Exception as e:
            raise ServeError(500, f"compiling the kernels of this request failed: "
                             f"{type(e).__name__}", type="server_error") from None
        return None if any(k is None for k in kernels) else kernels

    def _pin(self, job: _Job) -> bool:
        """Pins the job's cartridges and holds their bank slots; False while they must wait."""
        with self.catalogue.lock:
            try:
                cartridges = self.catalogue.acquire(job.ids)
            except budget_lib.BudgetExceededError:
                return False
        slot_of = self.bank.place(dict(zip(job.ids, cartridges)))
        if slot_of is None:
            with self.catalogue.lock:
                self.budget.release(job.ids)
            return False
        job.bank_slots, job.pinned = [slot_of[i] for i in job.ids], True
        return True

    def _try_admit(self, job: _Job) -> bool:
        target = self._target(job)
        if target is None:
            return False
        t = self.prompt_bucket(len(job.prompt))
        keys = [("prefill", t, bool(job.infos)), ("reset", *target), ("insert", *target[:2]),
                ("step", *target)]
        if self._pool is not None and self._pool.shape != target:
            keys.append(("relayout", self._pool.shape, target))
        kernels = self._kernels(keys)
        if kernels is None or not self._pin(job):
            return False
        if self._pool is None:
            self._pool = self._new_pool(target)
        elif self._pool.shape != target:
            self._relayout(target, kernels[4])
        composed = self._compose(job)
        first = self._prefill(job, kernels[0], t, composed)
        self._place(job, composed, kernels[1], kernels[2], first[:2])
        job.handle.emit("start")
        self._take(job, *first[2:])
        return True

    def _compose(self, job: _Job) -> dict:
        if not job.infos:
            return self._no_cartridges
        c = max(self.config.max_cartridges, 1)
        selection = np.zeros((1, c), np.int32)
        selected = np.zeros((1, c), bool)
        selection[0, :len(job.bank_slots)] = job.bank_slots
        selected[0, :len(job.bank_slots)] = True
        return self.kernels.compose(self.bank.bank, selection, selected,
                                    geometry=self.config.geometry)

    def _prefill(self, job: _Job, prefill, t: int, composed: dict) -> tuple:
        n = len(job.prompt)
        tokens = np.zeros((1, t), np.int32)
        positions = np.full((1, t), -1, np.int32)
        tokens[0, :n] = job.prompt
        positions[0, :n] = job.start + np.arange(n)
        rows = self._row_values([job], 1)
        k, v, *first = prefill(
            self.kernels.params, tokens, positions, composed if job.infos else None,
            np.int32(n - 1), rows_tuple(rows, job.params.top_logprobs > 0))
        return k, v, *(a[0] for a in jax.device_get(first))

    def _place(self, job: _Job, composed: dict, reset, insert, kv: tuple) -> None:
        """Writes the prefilled prompt into a free row, after the slots its decode steps use."""
        pool = self._pool
        job.row = self._rows.index(None)
        self._rows[job.row] = job
        pool.cache, pool.prefix, pool.counts = reset(pool.cache, pool.prefix, pool.counts,
                                                     np.int32(job.row), composed)
        n, base = len(job.prompt), pool.pointer + job.params.max_tokens - 1
        job.slots = [(base + j) % pool.slots for j in range(n)]
        for c in range(-(-n // CHUNK)):
            idx = np.arange(c * CHUNK, (c + 1) * CHUNK)
            slots = np.where(idx < n, (base + idx) % pool.slots, pool.slots).astype(np.int32)
            positions = np.where(idx < n, job.start + idx, -1).astype(np.int32)
            pool.cache = insert(pool.cache, np.int32(job.row), slots, kv[0][c], kv[1][c],
                                positions)
        job.detok = Detokenizer(self.model.tokenizer)
        job.stops = StopText(job.params.stop) if job.params.stop else None
        job.joined_step = self.steps
        self.largest_batch = max(self.largest_batch, sum(j is not None for j in self._rows))

    # ------------------------------------------------------------------ pool shapes

    def _new_pool(self, shape: tuple[int, int, bool]) -> _Pool:
        self._rows = [None] * shape[0]
        return _Pool(*shape, *self.kernels.empty_pool(*shape))

    def _relayout(self, shape: tuple[int, int, bool], relayout) -> None:
        """Moves the live rows into a pool of `shape`: rows packed from 0, each row's slots at
        the end of its ring, the pointer at 0 (module doc: its next writes go to 0, 1, ...)."""
        rows, slots, prefixed = shape
        src_row = np.full((rows,), -1, np.int32)
        src_slot = np.full((rows, slots), -1, np.int32)
        jobs = [j for j in self._rows if j is not None]
        for r, job in enumerate(jobs):
            src_row[r] = job.row
            src_slot[r, slots - len(job.slots):] = job.slots
            job.row, job.slots = r, list(range(slots - len(job.slots), slots))
        pool = self._pool
        cache, prefix, counts = relayout(pool.cache, pool.prefix, pool.counts, src_row, src_slot)
        self._pool = _Pool(rows, slots, prefixed, cache, prefix, counts)
        self._rows = jobs + [None] * (rows - len(jobs))

    def _shrink(self) -> None:
        """Drops the pool when idle; a quarter of its rows once the live rows fit them."""
        jobs = [j for j in self._rows if j is not None]
        if self._pool is None or (not jobs and not self._waiting):
            self._pool, self._rows = None, []
            return
        rows, slots, prefixed = self._pool.shape
        if not jobs or len(jobs) > rows // 4:
            return
        target = (self.row_bucket(rows // 4), slots, prefixed)
        relayout = self.kernels.get(("relayout", self._pool.shape, target))
        if relayout is not None and self.kernels.get(("step", *target)) is not None:
            self._relayout(target, relayout)

    # ------------------------------------------------------------------ decoding

    def _row_values(self, jobs: list[_Job], n: int) -> dict[str, np.ndarray]:
        arrays = row_arrays(n)
        for i, job in enumerate(jobs):
            r = i if n == 1 else job.row
            p = job.params
            arrays["temperature"][r], arrays["top_p"][r] = p.temperature, p.top_p
            arrays["frequency"][r], arrays["presence"][r] = p.frequency_penalty, p.presence_penalty
            arrays["seed"][r], arrays["draw"][r] = job.seed, len(job.tokens)
        return arrays

    def _step(self) -> None:
        pool = self._pool
        step = self.kernels.get(("step", *pool.shape))
        if step is None:
            return
        jobs = [j for j in self._rows if j is not None]
        tokens = np.zeros((pool.rows,), np.int32)
        positions = np.full((pool.rows,), -1, np.int32)
        for job in jobs:
            tokens[job.row] = job.tokens[-1]
            positions[job.row] = job.start + len(job.prompt) + len(job.tokens) - 1
        want_top = any(j.params.top_logprobs for j in jobs)
        pool.cache, pool.counts, nxt, lp, top_ids, top_lp = step(
            self.kernels.unrolled, pool.cache, pool.prefix, pool.counts, tokens, positions,
            np.int32(pool.pointer), rows_tuple(self._row_values(jobs, pool.rows), want_top))
        for job in jobs:
            job.slots.append(pool.pointer)
        pool.pointer = (pool.pointer + 1) % pool.slots
        nxt, lp = jax.device_get((nxt, lp))
        top_ids, top_lp = jax.device_get((top_ids, top_lp)) if want_top else (None, None)
        with self._lock:
            self.steps += 1
        for job in jobs:
            r = job.row
            self._take(job, int(nxt[r]), float(lp[r]),
                       None if top_ids is None else top_ids[r], None if top_lp is None
                       else top_lp[r])

    def _take(self, job: _Job, token: int, logprob: float, top_ids, top_lp) -> None:
        """One new token of `job`: its text, logprobs and whether it ends the request."""
        token = int(token)
        job.tokens.append(token)
        p = job.params
        if token in self.stop_ids:
            text, stopped = job.detok.flush(), False
            if job.stops is not None:
                text, stopped = job.stops.push(text)
                text += "" if stopped else job.stops.flush()
            return self._finish(job, "stop", text, [])
        entries = []
        if p.logprobs:
            top = tuple((int(i), float(v)) for i, v in
                        zip(top_ids[:p.top_logprobs], top_lp[:p.top_logprobs])) \
                if p.top_logprobs else ()
            entries.append(TokenLogprob(token, float(logprob), top))
        text, stopped = job.detok.push(token), False
        if len(job.tokens) >= p.max_tokens:
            text += job.detok.flush()
        if job.stops is not None:
            text, stopped = job.stops.push(text)
        if stopped:
            return self._finish(job, "stop", text, entries)
        if len(job.tokens) >= p.max_tokens:
            return self._finish(job, "length", text + (job.stops.flush() if job.stops else ""),
                                entries)
        self._emit(job, text, entries)

    def _emit(self, job: _Job, text: str, entries: list[TokenLogprob]) -> None:
        job.text.append(text)
        job.logprobs += entries
        if text or entries:
            job.handle.emit("delta", Delta(text, tuple(entries)))

    def _finish(self, job: _Job, reason: str, text: str, entries: list[TokenLogprob]) -> None:
        self._emit(job, text, entries)
        self._end(job)
        job.handle.emit("done", Completion(
            "".join(job.text), reason, len(job.prompt), len(job.tokens),
            sum(i.tokens for i in job.infos) - max(0, len(job.infos) - 1),
            tuple(job.logprobs) if job.params.logprobs else None))

    # ------------------------------------------------------------------ status

    def status(self) -> dict:
        with self.catalogue.lock:
            budget = {"budget_bytes": self.budget.budget_bytes,
                      "resident_bytes": self.budget.resident_bytes,
                      "pinned_bytes": self.budget.pinned_bytes,
                      "paging": dataclasses.asdict(self.budget.stats)}
        pool = self._pool
        with self._lock:
            return {"engine": "continuous", "queued": self._inbox.qsize() + len(self._waiting),
                    "running": sum(j is not None for j in list(self._rows)),
                    "pool": None if pool is None else list(pool.shape), "steps": self.steps,
                    "requests": self.requests, "largest_batch": self.largest_batch,
                    "compiles": dict(self.kernels.compiled),
                    "compile_s": round(self.kernels.compile_s, 3),
                    "compiles_queued": self.kernels.pending(), **budget}

    def close(self) -> None:
        """Fails the requests still queued or running, stops the threads, closes the budget."""
        self._inbox.put(_CLOSE)
        self._thread.join()
        self.kernels.close()
        self.catalogue.close()
