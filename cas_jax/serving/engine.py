"""What the server's engines share: their configuration, a request's sampling parameters, its
handle (events, result, cancellation) and its result.

Two engines serve `cas_jax.serving.server`, both with cartridges paged by one `BudgetManager` and
composed through one fixed-shape `CartridgeBank` (`serving_cartridges`):
  continuous (`serving_continuous`, the default): requests join the running batch at the next
    decode step and leave when they finish; their KV lives in a pool of rows reused across
    requests; text streams token by token.
  static (`serving_static`): today's request-level batching, kept for comparison: requests
    with equal sampling keys run to completion in one `sampling.generate` call.

A request's life: the server renders its messages to prompt tokens (`serving_prompt`, off
the engine thread), then `engine.submit` checks it against the cartridge catalogue and the
window (raising `ServeError`) and returns a `Handle`. The engine emits the handle's events on
its own thread: ("start", None) once the request holds a row (from then on its errors come as
events), ("delta", Delta) as text becomes final, then ("done", Completion) or ("error",
exception). `Handle.cancel` (a client that went away) ends it at the next step and frees its row.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

from cas_jax.cartridges import attention
from cas_jax.documents import retrieval
from cas_jax.model import sampling
from cas_jax.serving.text import TokenLogprob

ENGINES = ("continuous", "static")
MAX_TOP_LOGPROBS = 20

COMPILE_LOCK = threading.Lock()
"""Held by every XLA compile the serving engines make: the continuous engine's compile thread
holds it per compile (`serving_kernels`), the static engine while it runs a batch. No two
serving threads of a process compile at once (XLA:CPU crashed when two did, BUILD_NOTES "CI")."""


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """budget_bytes: device bytes of resident cartridges (`BudgetManager`).
    engine: "continuous" or "static" (module doc).
    max_batch: most requests decoding at once (continuous: rows of the pool; static: rows of
      one `generate` call). batch_wait_ms (static): once a request is pending, the engine
      takes more until none arrives for this long.
    max_cartridges: C, most cartridges per request (selection slots per row).
    max_cartridge_tokens: P_max, tokens of a bank slot; None = the largest cartridge in the
      store at start-up (128 for an empty store).
    bank_slots: cartridges in the bank; None = max_batch * max_cartridges, capped by how many
      P_max-token cartridges `budget_bytes` holds (at least max_cartridges).
    default_max_tokens: completion length when a request gives none.
    model_id: the model's name in /v1/models and responses; None = the model file's name.
    geometry: how a request's cartridges are composed (`attention.Geometry`); None = the one
      the store's cartridges were trained under (their meta; they must agree).
    documents: id -> text of the documents the cartridges stand for; a routing geometry
      (relevance > 0) needs them: a request's cartridges are biased by their documents'
      `router` scores for its last user message (`retrieval.Router`, as evaluation routes a
      question), so a routed request must name cartridges whose ids are documents here.
      None = the texts the store records (`CartridgeStore.documents`: those of every
      cartridge trained or initialised in it).
    router: "bm25" or "dense" (`retrieval.make_retriever`).
    max_cache_tokens (continuous): rows x KV slots per row of the pool; None = max(context
      window, max_batch * 1024). min_cache_tokens: the smallest KV slots per row.
    prefill_tokens_per_step (continuous): prompt tokens admitted between two decode steps
      (at least one request is), so joining requests do not stall the running ones for long.
    prefill_rows (continuous): most prompts of one prompt bucket prefilled in one call.
    prefill_chunk (continuous): a prompt longer than this (a multiple of 64) is prefilled in
      chunks of this many tokens, one per decode step of the running rows, besides the
      prefill_tokens_per_step of shorter prompts (`serving_prefill`): a long prompt does not
      stall the running rows, and prompt shapes stay few.
    warmup (continuous): compile the common shapes at start-up, on a background thread.
    escape_special_tokens: the default of the request field of that name (`serving_prompt`).
    max_body_bytes: request bodies larger than this get 413 before they are parsed.
    tokenizer_threads: threads rendering prompts (off the engine thread).
    """

    budget_bytes: int = 1 << 30
    engine: str = "continuous"
    max_batch: int = 16
    batch_wait_ms: float = 5.0
    max_cartridges: int = 4
    max_cartridge_tokens: int | None = None
    bank_slots: int | None = None
    default_max_tokens: int = 256
    model_id: str | None = None
    geometry: attention.Geometry | None = None
    documents: Mapping[str, str] | None = None
    router: str = "bm25"
    max_cache_tokens: int | None = None
    min_cache_tokens: int = 128
    prefill_tokens_per_step: int = 512
    prefill_rows: int = 8
    prefill_chunk: int = 512
    warmup: bool = True
    escape_special_tokens: bool = False
    max_body_bytes: int = 1 << 20
    tokenizer_threads: int = 1

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine {self.engine!r}: expected one of {ENGINES}")
        if self.max_batch < 1 or self.max_cartridges < 0:
            raise ValueError("max_batch must be >= 1 and max_cartridges >= 0")
        if self.router not in retrieval.RETRIEVER_KINDS:
            raise ValueError(f"router {self.router!r}: expected one of "
                             f"{retrieval.RETRIEVER_KINDS}")


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
class Sampling:
    """A request's sampling parameters.

    seed: the row's random stream (None: a fresh one); with the same seed, prompt and
      parameters a sampled completion repeats. logprobs: report each kept token's
      log-probability under the model (before penalties, temperature and top-p) and its
      `top_logprobs` most likely alternatives. The static engine batches requests with equal
      `key` and supports neither seed nor logprobs.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def key(self) -> tuple:
        top_p = self.top_p if self.temperature > 0 else 1.0  # greedy ignores top-p
        return (self.temperature, top_p, self.frequency_penalty, self.presence_penalty,
                sampling.bucket(self.max_tokens))


@dataclasses.dataclass(frozen=True)
class Delta:
    """Text made final by one decode step (may be empty) and its tokens' logprobs."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclasses.dataclass(frozen=True)
class Completion:
    """A finished request. finish_reason: "stop" (stop token or string) or "length".
    completion_tokens counts the tokens generated for it: up to the stop token, or up to the
    token that completed a stop string (the continuous engine stops there). logprobs: one
    entry per kept token (none for the stop token), when asked for."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cartridge_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None


Listener = Callable[[str, Any], None]



def cancelled() -> ServeError:
    """The error a cancelled request ends with."""
    return ServeError(499, "the request was cancelled: its client went away", code="cancelled")


class Handle:
    """A submitted request (module doc): `listener(kind, payload)` receives its events on the
    engine thread; `result()` waits for its Completion."""

    def __init__(self, listener: Listener | None = None):
        self._listener = listener
        self._cancelled = threading.Event()
        self.future: Future = Future()

    def emit(self, kind: str, payload: Any = None) -> None:
        """Engine side: delivers one event (done and error also settle `future`)."""
        if self._listener is not None:
            self._listener(kind, payload)
        if kind == "done":
            self.future.set_result(payload)
        elif kind == "error":
            self.future.set_exception(payload)

    def cancel(self) -> None:
        """Asks the engine to drop the request (no further events are promised)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def result(self, timeout: float | None = None) -> Completion:
        return self.future.result(timeout)
