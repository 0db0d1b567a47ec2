"""The static engine (`ServeConfig.engine="static"`): request-level batching, kept to compare
with the continuous engine (`benchmarks.serve`).

The engine thread collects queued requests until `max_batch` are waiting, or none has arrived
for `batch_wait_ms`, then runs the oldest with every later one that shares its sampling key
(temperature, top-p, penalties, bucketed max_tokens) and fits, in ONE `sampling.generate` call;
the rest wait for the next call. A batch runs to completion before the next starts, so a
request's text comes as one piece when its batch ends; each row is then cut to its max_tokens
and stop strings (completion_tokens counts every token generated). Cartridges are pinned when
the batch forms (a request whose cartridges do not fit the budget beside the batch's waits)
and composed through the shared bank (`serving_cartridges`). Seeds and logprobs need the
continuous engine.
"""

from __future__ import annotations

import dataclasses
import queue
import threading

import jax
import jax.numpy as jnp

from cas_jax.cartridges import attention, budget as budget_lib
from cas_jax.cartridges.cartridge import Cartridge
from cas_jax.cartridges.store import CartridgeStore
from cas_jax.model import sampling, tokenizer as tok_lib
from cas_jax.model.loading import LoadedModel
from cas_jax.serving.cartridges import CartridgeInfo, EngineBase
from cas_jax.serving.engine import Completion, Delta, Handle, Listener, Sampling, ServeConfig
from cas_jax.serving.engine import COMPILE_LOCK, ServeError, cancelled

_compose = jax.jit(attention.compose, static_argnames=("geometry",))


@dataclasses.dataclass(eq=False)
class _Job:
    prompt: list[int]
    infos: list[CartridgeInfo]
    params: Sampling
    handle: Handle
    bias: tuple[float, ...] = ()  # its cartridges' logit biases (routing geometry only)
    cartridges: list[Cartridge] = dataclasses.field(default_factory=list)  # pinned
    bank_slots: list[int] = dataclasses.field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return [i.id for i in self.infos]


class StaticEngine(EngineBase):
    """Serves chat completions batch by batch (module doc)."""

    def __init__(self, model: LoadedModel, store: CartridgeStore,
                 config: ServeConfig = ServeConfig()):
        super().__init__(model, store, config)
        self.stop_ids = tuple(tok_lib.stop_token_ids(model.tokenizer))
        self.batches = 0  # generate calls run
        self._thread = threading.Thread(target=self._loop, name="cas-serving-static",
                                        daemon=True)
        self._thread.start()

    def _prefix_width(self, with_cartridges: bool) -> int:
        return self.config.max_cartridges * self.max_cartridge_tokens if with_cartridges else 0

    def _padded(self, prompt: int, max_tokens: int, with_cartridges: bool) -> int:
        """Positions `sampling.generate` allocates: bucketed prompt and output, every slot."""
        return (sampling.bucket(prompt) + sampling.bucket(max_tokens)
                + self._prefix_width(with_cartridges))

    def submit(self, prompt: list[int], cartridge_ids: list[str], params: Sampling,
               listener: Listener | None = None, query: str = "") -> Handle:
        """Checks a request and queues it (`serving_engine` module doc); `query` (its last
        user message) routes its cartridges under a routing geometry."""
        if params.seed is not None or params.logprobs:
            raise ServeError(400, "seed and logprobs need the continuous engine "
                             "(--engine=continuous)", param="seed" if params.seed is not None
                             else "logprobs")
        if not prompt:
            raise ServeError(400, "the prompt is empty", param="messages")
        infos = self.catalogue.check_request(len(prompt), list(cartridge_ids),
                                             params.max_tokens)
        window = self.model.config.max_position_embeddings
        padded = self._padded(len(prompt), params.max_tokens, bool(infos))
        if padded > window:
            raise ServeError(400, f"prompt ({len(prompt)} tokens, padded to "
                             f"{sampling.bucket(len(prompt))}) + max_tokens "
                             f"({params.max_tokens}, padded to "
                             f"{sampling.bucket(params.max_tokens)}) + cartridge slots "
                             f"({self._prefix_width(bool(infos))}) = {padded} exceed the context "
                             f"window of {window} tokens; lower max_tokens", param="max_tokens",
                             code="context_length_exceeded")
        bias = self.catalogue.biases(query, list(cartridge_ids))
        job = _Job(list(prompt), infos, params, Handle(listener), bias)
        self._inbox.put(job)
        return job.handle

    # ------------------------------------------------------------------ the engine thread

    def _collect(self, pending: list[_Job]) -> bool:
        """Adds queued jobs to `pending` (module doc); False once the engine is closing."""
        if not pending:
            job = self._inbox.get()
            if job is None:
                return False
            pending.append(job)
        while len(pending) < self.config.max_batch:
            try:
                job = self._inbox.get(timeout=self.config.batch_wait_ms / 1000)
            except queue.Empty:
                return True
            if job is None:
                return False
            pending.append(job)
        return True

    def _loop(self) -> None:
        pending: list[_Job] = []
        while self._collect(pending):
            for job in [j for j in pending if j.handle.cancelled]:
                pending.remove(job)
                job.handle.emit("error", cancelled())
            if pending:
                batch = self._take_batch(pending)
                pending = [j for j in pending if j not in batch]
                with COMPILE_LOCK:  # a batch's calls compile on this thread (serving_engine)
                    self._run(batch)
        for job in pending:
            job.handle.emit("error", ServeError(503, "the server is shutting down",
                                                type="server_error"))

    def _take_batch(self, pending: list[_Job]) -> list[_Job]:
        """The oldest job with every later one that shares its sampling key, fits the window,
        the bank and the budget, pinned; jobs whose cartridges do not fit stay pending."""
        key = pending[0].params.key
        batch, distinct = [], set()
        window = self.model.config.max_position_embeddings
        for job in list(pending):
            ids = distinct | set(job.ids)
            rows = batch + [job]
            padded = self._padded(max(len(j.prompt) for j in rows),
                                  max(j.params.max_tokens for j in rows), bool(ids))
            if (len(batch) >= self.config.max_batch or job.params.key != key
                    or len(ids) > self.bank.size or padded > window):
                continue
            with self.catalogue.lock:
                try:
                    job.cartridges = self.catalogue.acquire(job.ids)
                except budget_lib.BudgetExceededError:
                    continue
                except ServeError as e:
                    pending.remove(job)
                    job.handle.emit("error", e)
                    continue
            batch.append(job)
            distinct = ids
        return batch

    def _run(self, batch: list[_Job]) -> None:
        try:
            if not batch:
                return
            for job in batch:
                job.handle.emit("start")
            prefix = self._prefix(batch)
            s = batch[0].params
            params = sampling.SamplingParams(
                max_new_tokens=max(j.params.max_tokens for j in batch),
                temperature=s.temperature, top_p=s.top_p, stop_ids=self.stop_ids,
                frequency_penalty=s.frequency_penalty, presence_penalty=s.presence_penalty)
            outs = sampling.generate(self.model.params, self.model.config,
                                     [j.prompt for j in batch], params, prefix=prefix,
                                     seed=self.batches)
            self.batches += 1
            self.requests += len(batch)
            self.largest_batch = max(self.largest_batch, len(batch))
            for job, out in zip(batch, outs):
                c = self._finish(job, out)
                job.handle.emit("delta", Delta(c.text))
                job.handle.emit("done", c)
        except Exception as e:  # a failed batch fails its requests, not the server
            for job in batch:
                if not job.handle.future.done():
                    job.handle.emit("error", e)
        finally:
            for job in batch:
                self.bank.release(job.bank_slots)
            with self.catalogue.lock:
                for job in batch:
                    self.budget.release(job.ids)

    def _prefix(self, batch: list[_Job]) -> dict | None:
        """The composed prefix {k, v: [L, B_pad, C*P_max, K, Dh], mask, start} or None; rows
        past the batch repeat its last row, as `sampling.generate` pads."""
        if not any(j.infos for j in batch):
            return None
        for job in batch:  # the batch's distinct cartridges fit the bank (_take_batch)
            slot_of = self.bank.place(dict(zip(job.ids, job.cartridges)))
            job.bank_slots = [slot_of[i] for i in job.ids]
        rows = [batch[min(i, len(batch) - 1)] for i in range(sampling.bucket(len(batch),
                                                                            minimum=1))]
        routed = self.config.geometry.relevance > 0
        selection, selected, bias = attention.selection_arrays(
            [j.bank_slots for j in rows], self.config.max_cartridges,
            [j.bias for j in rows] if routed else None)
        return _compose(self.bank.bank, jnp.asarray(selection), jnp.asarray(selected),
                        geometry=self.config.geometry,
                        cartridge_bias=None if bias is None else jnp.asarray(bias))

    def _finish(self, job: _Job, tokens: list[int]) -> Completion:
        tokens = tokens[:job.params.max_tokens]
        stopped = bool(tokens) and tokens[-1] in self.stop_ids
        text = self.model.tokenizer.decode(tokens, skip_special_tokens=True)
        cuts = [text.find(s) for s in job.params.stop if s in text]
        if cuts:
            text, stopped = text[:min(cuts)], True
        return Completion(text, "stop" if stopped else "length", len(job.prompt), len(tokens),
                          attention.visible_tokens([i.tokens for i in job.infos]))

    def status(self) -> dict:
        return {"engine": "static", "queued": self._inbox.qsize(), "batches": self.batches,
                "requests": self.requests, "largest_batch": self.largest_batch,
                **self.budget_status()}

    def close(self) -> None:
        """Fails the requests still queued, stops the engine thread, closes the budget."""
        self._inbox.put(None)
        self._thread.join()
        self.catalogue.close()
