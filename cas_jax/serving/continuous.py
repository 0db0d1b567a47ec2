"""The continuous-batching engine: requests join the running batch at the next decode step
and leave when they finish.

The pool (`serving_pool`, `serving_kernels`) has R rows x S KV slots per row, both bucketed,
so the kernels compile once per bucket, on a background thread: a request whose shapes are not
compiled yet waits while the running rows keep decoding. Between two decode steps the engine
thread
  1. drops cancelled requests (their rows, bank slots and pins are freed at once);
  2. admits waiting requests in order, up to prefill_tokens_per_step prompt tokens (one that
     must wait is passed by later ones, at most max_batch times, so none starves): pins
     each request's cartridges in the budget manager (it waits while pinned cartridges fill
     the budget), holds their bank slots, composes its prefix with `attention.compose` under
     `ServeConfig.geometry`, prefills its prompt at positions from `attention.query_start`
     (exactly the layout of training, scoring and `sampling.generate`) together with up to
     prefill_rows - 1 others of its prompt bucket, samples its first token and writes its K/V
     into a free row, growing the pool when no row is free; a prompt longer than
     prefill_chunk instead begins its chunked prefill (3) when none is under way;
  3. prefills the next chunk of that prompt (`serving_prefill`) and, once its last chunk is
     done, gives it a row as in 2 (no request is admitted while it waits for one);
  4. runs one decode step of every row: per-row temperature, top-p, penalties and seed;
  5. hands each row's token to its detokeniser and stop-string matcher, emits the text made
     final, and finishes rows on a stop token, a stop string or max_tokens;
  6. shrinks the pool when a quarter of it would do (and drops it when idle).
"""

from __future__ import annotations

import collections
import queue
import secrets
import threading

import jax
import numpy as np

from cas_jax.cartridges import attention, budget as budget_lib
from cas_jax.cartridges.store import CartridgeStore
from cas_jax.model import tokenizer as tok_lib
from cas_jax.model.loading import LoadedModel
from cas_jax.serving.cartridges import EngineBase
from cas_jax.serving.engine import Completion, Delta, Handle, Listener, Sampling, ServeConfig
from cas_jax.serving.engine import ServeError, cancelled
from cas_jax.serving.kernels import Kernels
from cas_jax.serving.row_sampling import rows_tuple
from cas_jax.serving.pool import Job, Pool, Shapes
from cas_jax.serving.prefill import LongPrefill, prefill_group, row_values
from cas_jax.serving.text import Detokenizer, StopText, TokenLogprob

_WAKE, _CLOSE = "wake", "close"


class ContinuousEngine(EngineBase):
    """Serves chat completions for `model` from cartridges in `store` (module doc)."""

    def __init__(self, model: LoadedModel, store: CartridgeStore,
                 config: ServeConfig = ServeConfig()):
        super().__init__(model, store, config)
        config = self.config  # its geometry resolved
        self.stop_ids = frozenset(tok_lib.stop_token_ids(model.tokenizer))
        self.shapes = Shapes(config, model.config.max_position_embeddings)
        self.kernels = Kernels(model, self.bank.bank, config.max_cartridges, config.geometry,
                               on_ready=lambda: self._inbox.put(_WAKE))
        self.bank.put = lambda tokens, dtype: self.kernels.get(("put", tokens, dtype))
        self._no_cartridges: dict | None = None  # the prefix of a row without cartridges
        self._pool: Pool | None = None
        self._waiting: collections.deque[Job] = collections.deque()
        self._long: LongPrefill | None = None  # the prompt prefilling in chunks
        self._moved = False  # it moved in the last iteration: the next one does not wait
        self.steps = 0  # decode steps run
        self._lock = threading.Lock()  # guards the counters read by status()
        if config.warmup:
            self.kernels.warm([("compose",)] + [("put", *s) for s in self.catalogue.sizes()]
                              + self.shapes.warm_keys())
        self._thread = threading.Thread(target=self._loop, name="cas-serving-engine",
                                        daemon=True)
        self._thread.start()

    def _live(self) -> list[Job]:
        return [] if self._pool is None else self._pool.live()

    # ------------------------------------------------------------------ requests

    def submit(self, prompt: list[int], cartridge_ids: list[str], params: Sampling,
               listener: Listener | None = None, query: str = "") -> Handle:
        """Checks a request and queues it; its Handle (module doc of `serving_engine`).
        Raises ServeError for a request the server refuses. `query` (its last user message)
        routes its cartridges under a routing geometry."""
        if not prompt:
            raise ServeError(400, "the prompt is empty", param="messages")
        infos = self.catalogue.check_request(len(prompt), list(cartridge_ids),
                                             params.max_tokens)
        need = len(prompt) + params.max_tokens - 1
        if need > self.shapes.slot_cap:
            raise ServeError(400, f"prompt ({len(prompt)} tokens) + max_tokens "
                             f"({params.max_tokens}) need {need} KV slots; a row holds at most "
                             f"{self.shapes.slot_cap} (--max_cache_tokens)", param="max_tokens",
                             code="context_length_exceeded")
        start = attention.query_start([i.tokens for i in infos], self.config.geometry)
        seed = secrets.randbits(32) if params.seed is None else params.seed % (1 << 32)
        bias = self.catalogue.biases(query, list(cartridge_ids))
        job = Job(list(prompt), infos, params, Handle(listener), seed, start, need, bias)
        self._inbox.put(job)
        return job.handle

    # ------------------------------------------------------------------ the engine thread

    def _loop(self) -> None:
        closing = False
        while not closing:
            busy = bool(self._live()) or self._moved
            try:
                item = self._inbox.get(block=not busy, timeout=0.05 if (
                    self._waiting or self._long) and not busy else None)
            except queue.Empty:
                item = None
            while item is not None:
                if item is _CLOSE:
                    closing = True
                elif isinstance(item, Job):
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
                self._moved = self._advance_long()
                if self._live():
                    self._step()
                self._shrink()
            except Exception as e:  # a failed step fails its requests, not the server
                self._fail_all(e)
        self._fail_all(ServeError(503, "the server is shutting down", type="server_error"))

    def _fail_all(self, error: Exception) -> None:
        long = [] if self._long is None else [self._long.job]
        for job in self._live() + list(self._waiting) + long:
            self._end(job)
            job.handle.emit("error", error)
        self._waiting.clear()
        self._pool, self._long = None, None

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._waiting if j.handle.cancelled]:
            self._waiting.remove(job)
            job.handle.emit("error", cancelled())
        for job in self._live():
            if job.handle.cancelled:
                self._end(job)
                job.handle.emit("error", cancelled())
        if self._long is not None and self._long.job.handle.cancelled:
            self._drop_long(cancelled())

    def _drop_long(self, error: Exception) -> None:
        """Ends the request prefilling in chunks with `error`."""
        job, self._long = self._long.job, None
        self._end(job)
        job.handle.emit("error", error)

    def _end(self, job: Job) -> None:
        """Frees the row, bank slots and pins a job holds."""
        if job.row >= 0:
            self._pool.jobs[job.row] = None
            job.row = -1
        if job.pinned:
            self._unpin([job])
        with self._lock:
            self.requests += 1

    # ------------------------------------------------------------------ admission

    def _admit(self) -> None:
        """Admits waiting requests in order, those of one prefill key together (module doc). A
        request that must wait is passed by later ones, until max_batch have passed it."""
        if self._long is not None and self._long.done:
            return  # it waits for a row: nothing takes one before it
        used, skipped, group, started = 0, [], [], []
        for job in list(self._waiting):
            if any(j.passed >= self.config.max_batch for j in skipped):
                break
            if self.shapes.chunked(job):
                if self._long is None and self._begin_long(job):
                    started.append(job)
                elif self._long is None and job in self._waiting:
                    skipped.append(job)
                continue  # a long prompt waits for the one prefilling to end
            if group and used + len(job.prompt) > self.config.prefill_tokens_per_step:
                break
            if group and (self.shapes.prefill_key(job) != self.shapes.prefill_key(group[0])
                          or len(group) >= self.config.prefill_rows):
                continue  # the next admission takes it
            if self._target(group + [job]) is None or not self._pin(job):
                if job in self._waiting:  # not dropped by _pin
                    skipped.append(job)
                continue
            group.append(job)
            used += len(job.prompt)
        try:
            started += self._start(group, skipped) if group else []
        except ServeError as e:  # the group's kernels failed to compile
            self._unpin(group)
            for job in group:
                self._waiting.remove(job)
                job.handle.emit("error", e)
        order = {id(job): i for i, job in enumerate(self._waiting)}
        for job in skipped:
            job.passed += sum(order[id(s)] > order[id(job)] for s in started)
        for job in started:
            self._waiting.remove(job)

    def _target(self, jobs: list[Job]) -> tuple[int, int, bool] | None:
        return (self.shapes.new_pool(jobs) if self._pool is None
                else self._pool.target(self.shapes, jobs))

    def _kernels(self, keys: list[tuple]) -> dict | None:
        """The compiled kernels of `keys` by kind, or None while one is still compiling."""
        try:
            kernels = {k[0]: self.kernels.get(k) for k in keys}
        except Exception as e:
            raise ServeError(500, f"compiling the kernels of this request failed: "
                             f"{type(e).__name__}", type="server_error") from None
        return None if any(k is None for k in kernels.values()) else kernels

    def _pin(self, job: Job) -> bool:
        """Pins the job's cartridges and holds their bank slots; False while they must wait.
        ServeError (emitted, the job dropped) if one cannot be read."""
        with self.catalogue.lock:
            try:
                cartridges = self.catalogue.acquire(job.ids)
            except budget_lib.BudgetExceededError:
                return False
            except ServeError as e:
                self._waiting.remove(job)
                job.handle.emit("error", e)
                return False
        slot_of = self.bank.place(dict(zip(job.ids, cartridges)))
        if slot_of is None:
            with self.catalogue.lock:
                self.budget.release(job.ids)
            return False
        job.bank_slots, job.pinned = [slot_of[i] for i in job.ids], True
        return True

    def _unpin(self, jobs: list[Job]) -> None:
        """Releases the jobs' bank slots and pins."""
        for job in jobs:
            self.bank.release(job.bank_slots)
            with self.catalogue.lock:
                self.budget.release(job.ids)
            job.pinned = False

    def _pool_kernels(self, jobs: list[Job], keys: list[tuple]) -> tuple[tuple, dict | None]:
        """The pool shape that takes `jobs` (None while they must wait) and the kernels of
        `keys`, reset, insert, step and the relayout to it if the pool changes shape (None
        while one compiles)."""
        target = self._target(jobs)
        if target is None:
            return target, None
        keys = keys + [("compose",), ("reset", *target), ("insert", *target[:2]),
                       ("step", *target)]
        if self._pool is not None and self._pool.shape != target:
            keys.append(("relayout", self._pool.shape, target))
        return target, self._kernels(keys)

    def _group_kernels(self, group: list[Job]) -> tuple[list[Job], tuple, dict]:
        """The longest head of `group` whose kernels are compiled (all of it, else its first
        job alone), with its target shape and kernels (`_pool_kernels` and the prefill).
        ([], ...) while they compile."""
        t, pfx = self.shapes.prefill_key(group[0])
        for jobs in ([group, group[:1]] if len(group) > 1 else [group]):
            prefill = ("prefill", self.shapes.prefill_rows(len(jobs)), t, pfx)
            target, kernels = self._pool_kernels(jobs, [prefill])
            if kernels is not None:
                return jobs, target, kernels
        return [], target, {}

    def _start(self, group: list[Job], skipped: list[Job]) -> list[Job]:
        """Prefills `group`'s jobs (pinned) in one call and gives each a row; the jobs started.
        Those whose kernels are still compiling are unpinned and join `skipped`."""
        jobs, target, kernels = self._group_kernels(group)
        self._unpin(group[len(jobs):])
        skipped += group[len(jobs):]
        if not jobs:
            return []
        composed = [self._compose(job) for job in jobs]
        k, v, *first = prefill_group(self.kernels, self.shapes, jobs, kernels["prefill"],
                                     self.shapes.prefill_rows(len(jobs)), composed)
        for i, job in enumerate(jobs):
            self._join(job, target, kernels, composed[i], lambda c, i=i: (k[i][c], v[i][c]),
                       [a[i] for a in first])
        return jobs

    def _join(self, job: Job, target: tuple, kernels: dict, composed: dict, piece,
              first: list) -> None:
        """Gives prefilled `job` a row of the pool (of shape `target`: made, or relaid out to
        it) with its prompt's K/V (`Pool.place`), and takes its first token."""
        if self._pool is None:
            self._pool = Pool.empty(self.kernels, target)
        elif self._pool.shape != target:
            self._pool = self._pool.relayout(target, kernels["relayout"])
        self._pool.place(job, composed, kernels["reset"], kernels["insert"], piece)
        job.detok = Detokenizer(self.model.tokenizer)
        job.stops = StopText(job.params.stop) if job.params.stop else None
        job.joined_step = self.steps
        job.handle.emit("start")
        self._take(job, *first)
        self.largest_batch = max(self.largest_batch, len(self._pool.live()))

    def _begin_long(self, job: Job) -> bool:
        """Begins prefilling `job`'s long prompt in chunks (pinned); False while it must wait
        (its chunk kernel compiles or its cartridges wait for the budget; dropped, with the
        error emitted, if one cannot be read or compiled)."""
        try:
            ready = self._kernels([self.shapes.chunk_key(job), ("compose",)]) is not None
        except ServeError as e:
            self._waiting.remove(job)
            job.handle.emit("error", e)
            return False
        if not ready or not self._pin(job):
            return False
        self._long = LongPrefill(self.kernels, self.shapes, job, self._compose(job))
        return True

    def _advance_long(self) -> bool:
        """The next chunk of the prompt prefilling in chunks; once it is done, its row (module
        doc, step 3). Whether it moved."""
        long = self._long
        if long is None:
            return False
        moved = False
        try:
            if not long.done:
                chunk = self._kernels([long.key])
                if chunk is None:
                    return False
                long.run(chunk["chunk"])
                moved = True
            target, kernels = self._pool_kernels([long.job], []) if long.done else (None, None)
        except ServeError as e:  # its kernels failed to compile
            self._drop_long(e)
            return False
        if kernels is not None:
            self._long = None
            self._join(long.job, target, kernels, long.composed, long.piece, long.first)
            moved = True
        return moved

    def _compose(self, job: Job) -> dict:
        """The job's prefix: one row of `attention.compose` of its bank slots (its callers
        made sure the compose kernel is compiled)."""
        if not job.infos and self._no_cartridges is not None:
            return self._no_cartridges
        routed = self.config.geometry.relevance > 0
        selection, selected, bias = attention.selection_arrays(
            [job.bank_slots], max(self.config.max_cartridges, 1), [job.bias] if routed else None)
        composed = self.kernels.get(("compose",))(  # the kernel takes biases when it routes
            self.bank.bank, selection, selected, *(() if bias is None else (bias,)))
        if not job.infos:
            self._no_cartridges = composed
        return composed

    def _shrink(self) -> None:
        """Drops the pool when idle; a quarter of its rows once the live rows fit them."""
        if self._pool is None or (not self._live() and not self._waiting):
            self._pool = None
            return
        target = self._pool.shrunk(self.shapes)
        if target is None:
            return
        kernels = self._kernels([("relayout", self._pool.shape, target), ("step", *target)])
        if kernels is not None:  # both are asked for at once: one wait for compiles, not two
            self._pool = self._pool.relayout(target, kernels["relayout"])

    # ------------------------------------------------------------------ decoding

    def _step(self) -> None:
        pool = self._pool
        step = self.kernels.get(("step", *pool.shape))
        if step is None:
            return
        jobs = pool.live()
        tokens, positions = pool.inputs()
        want_top = any(j.params.top_logprobs for j in jobs)
        rows = row_values([(j.row, j) for j in jobs], pool.rows)
        pool.cache, pool.counts, nxt, lp, top_ids, top_lp = step(
            self.kernels.step_params, pool.cache, pool.prefix, pool.counts, tokens, positions,
            np.int32(pool.pointer), rows_tuple(rows, want_top))
        pool.advance()
        nxt, lp = jax.device_get((nxt, lp))
        top_ids, top_lp = jax.device_get((top_ids, top_lp)) if want_top else (None, None)
        with self._lock:
            self.steps += 1
        for job in jobs:
            r = job.row
            self._take(job, int(nxt[r]), float(lp[r]),
                       None if top_ids is None else top_ids[r], None if top_lp is None
                       else top_lp[r])

    def _take(self, job: Job, token: int, logprob: float, top_ids, top_lp) -> None:
        """One new token of `job`: its text and logprobs, and the request's end if it ends it."""
        text, entries, reason = job.take(token, logprob, top_ids, top_lp, self.stop_ids)
        if reason is None:
            self._emit(job, text, entries)
        else:
            self._finish(job, reason, text, entries)

    def _emit(self, job: Job, text: str, entries: list[TokenLogprob]) -> None:
        job.text.append(text)
        job.logprobs += entries
        if text or entries:
            job.handle.emit("delta", Delta(text, tuple(entries)))

    def _finish(self, job: Job, reason: str, text: str, entries: list[TokenLogprob]) -> None:
        self._emit(job, text, entries)
        self._end(job)
        job.handle.emit("done", Completion(
            "".join(job.text), reason, len(job.prompt), len(job.tokens),
            sum(i.tokens for i in job.infos) - max(0, len(job.infos) - 1),
            tuple(job.logprobs) if job.params.logprobs else None))

    # ------------------------------------------------------------------ status

    def status(self) -> dict:
        budget = self.budget_status()
        pool, long = self._pool, self._long
        with self._lock:
            return {"engine": "continuous", "queued": self._inbox.qsize() + len(self._waiting),
                    "running": 0 if pool is None else len(pool.live()),
                    "pool": None if pool is None else list(pool.shape), "steps": self.steps,
                    "prefilling": None if long is None else [long.done_tokens,
                                                             len(long.job.prompt)],
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
