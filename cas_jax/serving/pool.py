"""The continuous engine's KV pool: rows x ring slots, their buckets, and rows moving in and
out.

Shapes are bucketed so the kernels compile a bounded number of times (`Shapes`): rows are
powers of two up to max_batch; KV slots per row are powers of two from min_cache_tokens,
capped by the window and max_cache_tokens (rows x slots never exceed max_cache_tokens), and a
pool has at least the slots of a short prompt answered at default_max_tokens (`base_slots`),
so common requests share one slot bucket; prompts are bucketed as `sampling.bucket` does
(powers of two to 256, then multiples of 256), capped by the window and by prefill_chunk
(a longer prompt is prefilled in chunks into a buffer whose slots are powers of two: `buffer`,
`serving_prefill`). A pool also has a prefix
(C*P_max slots per row) once a row with cartridges joins. A pool grows when a request needs
more rows or slots; its rows shrink to a quarter once a quarter holds them, its slots to what
its rows need (at least base_slots) once that is a quarter or less; an idle pool is dropped.

Ring slots: every row writes its decode step's K/V at one shared slot, the pointer, which
advances by one per step (modulo S). A request admitted at pointer p with T prompt tokens and
max_tokens m writes its decode steps at p .. p+m-2 and its prompt after them, so it needs
T + m - 1 slots of its row (`Job.need`) and never overwrites its own keys.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from cas_jax.model import sampling
from cas_jax.serving.cartridges import CartridgeInfo
from cas_jax.serving.engine import Handle, Sampling, ServeConfig
from cas_jax.serving.kernels import CHUNK, Kernels
from cas_jax.serving.text import Detokenizer, StopText, TokenLogprob


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclasses.dataclass(eq=False)
class Job:
    """A request, waiting or holding a row."""

    prompt: list[int]
    infos: list[CartridgeInfo]
    params: Sampling
    handle: Handle
    seed: int
    start: int  # first query position (attention.query_start)
    need: int  # KV slots of its row: prompt + max_tokens - 1
    bias: tuple[float, ...] = ()  # its cartridges' logit biases (routing geometry only)
    row: int = -1
    slots: list[int] = dataclasses.field(default_factory=list)  # its ring slots, oldest first
    bank_slots: list[int] = dataclasses.field(default_factory=list)
    pinned: bool = False  # its cartridges are pinned and its bank slots held
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: list[str] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    detok: Detokenizer | None = None
    stops: StopText | None = None
    joined_step: int = -1  # decode steps run before it joined
    passed: int = 0  # requests admitted before it while it waited

    @property
    def ids(self) -> list[str]:
        return [i.id for i in self.infos]

    def take(self, token: int, logprob: float, top_ids, top_lp, stop_ids: frozenset[int]
             ) -> tuple[str, list[TokenLogprob], str | None]:
        """One new token: the text it makes final, its logprob entry (when asked for) and
        the finish reason if it ends the request ("stop": a stop token or string; "length")."""
        token = int(token)
        self.tokens.append(token)
        p = self.params
        if token in stop_ids:
            text, stopped = self.detok.flush(), False
            if self.stops is not None:
                text, stopped = self.stops.push(text)
                text += "" if stopped else self.stops.flush()
            return text, [], "stop"
        entries = []
        if p.logprobs:
            top = tuple((int(i), float(v)) for i, v in
                        zip(top_ids[:p.top_logprobs], top_lp[:p.top_logprobs])) \
                if p.top_logprobs else ()
            entries.append(TokenLogprob(token, float(logprob), top))
        text, stopped = self.detok.push(token), False
        if len(self.tokens) >= p.max_tokens:
            text += self.detok.flush()
        if self.stops is not None:
            text, stopped = self.stops.push(text)
        if stopped:
            return text, entries, "stop"
        if len(self.tokens) >= p.max_tokens:
            return text + (self.stops.flush() if self.stops else ""), entries, "length"
        return text, entries, None


class Shapes:
    """The buckets of a pool's shapes (module doc)."""

    def __init__(self, config: ServeConfig, window: int):
        self.config = config
        self.max_cache_tokens = config.max_cache_tokens or max(window, config.max_batch * 1024)
        self.prompt_cap = -(-window // CHUNK) * CHUNK
        self.slot_cap = min(self.prompt_cap, self.max_cache_tokens)
        self.chunk = config.prefill_chunk
        if self.chunk < CHUNK or self.chunk % CHUNK:
            raise ValueError(f"prefill_chunk={self.chunk}: expected a positive multiple of "
                             f"{CHUNK}")

    def rows(self, n: int) -> int:
        return min(_pow2(n), self.config.max_batch)

    def slots(self, need: int) -> int:
        return min(max(_pow2(need), self.config.min_cache_tokens), self.slot_cap)

    @property
    def base_slots(self) -> int:
        return self.slots(64 + self.config.default_max_tokens)

    def new_pool(self, jobs: list["Job"]) -> tuple[int, int, bool]:
        """The shape of a pool started for `jobs`."""
        return (self.rows(len(jobs)), max(self.base_slots, *(self.slots(j.need) for j in jobs)),
                any(j.infos for j in jobs))

    def prefill_rows(self, n: int) -> int:
        """Rows of a prefill call for n prompts."""
        return min(_pow2(n), self.config.prefill_rows)

    def prefill_key(self, job: "Job") -> tuple[int, bool]:
        """Prompts with equal keys are prefilled together: (prompt bucket, has cartridges)."""
        return self.prompt(len(job.prompt)), bool(job.infos)

    def prompt(self, n: int) -> int:
        return min(sampling.bucket(n), self.prompt_cap)

    def chunked(self, job: "Job") -> bool:
        """Whether `job`'s prompt is prefilled in chunks: it is longer than prefill_chunk."""
        return len(job.prompt) > self.chunk

    def buffer(self, n: int) -> int:
        """Slots of the buffer of a prompt of n tokens prefilled in chunks."""
        chunks = -(-n // self.chunk) * self.chunk
        return min(_pow2(chunks), -(-self.prompt_cap // self.chunk) * self.chunk)

    def chunk_key(self, job: "Job") -> tuple:
        """The kernel prefilling `job`'s chunks: ("chunk", C, buffer slots, has cartridges)."""
        return "chunk", self.chunk, self.buffer(len(job.prompt)), bool(job.infos)

    def warm_keys(self) -> list[tuple]:
        """The kernels of short prompts answered at default_max_tokens: every row bucket, its
        growth, its shrinking and its change to a pool with prefixes; then the chunk kernel of
        every buffer bucket."""
        s = self.base_slots
        prefixes = (False, True) if self.config.max_cartridges else (False,)
        keys = [("prefill", n, t, p) for t in (16, 32, 64, 128) for p in prefixes
                for n in sorted({self.prefill_rows(2 ** i) for i in range(4)})
                if t <= self.prompt_cap and (n == 1 or t < 128)]
        r = 1
        while True:
            keys.append(("insert", r, s))
            for p in prefixes:
                keys += [("step", r, s, p), ("reset", r, s, p)]
                if p:
                    keys.append(("relayout", (r, s, False), (r, s, True)))
                if r >= 4:
                    keys.append(("relayout", (r, s, p), (self.rows(r // 4), s, p)))
            if r >= self.config.max_batch:
                break
            nxt = self.rows(r + 1)
            keys += [("relayout", (r, s, p), (nxt, s, q)) for p in prefixes for q in prefixes
                     if q >= p]
            r = nxt
        buffers = sorted({self.buffer(n) for n in range(self.chunk + 1, self.prompt_cap + 1,
                                                        self.chunk)})
        return keys + [("chunk", self.chunk, b, p) for b in buffers for p in prefixes]


@dataclasses.dataclass
class Pool:
    """The pool's device arrays (`serving_kernels`), the ring pointer and the job of each row."""

    rows: int
    slots: int
    prefixed: bool
    cache: dict
    prefix: dict | None
    counts: jax.Array
    jobs: list[Job | None]
    pointer: int = 0

    @classmethod
    def empty(cls, kernels: Kernels, shape: tuple[int, int, bool]) -> "Pool":
        return cls(*shape, *kernels.empty_pool(*shape), jobs=[None] * shape[0])

    @property
    def shape(self) -> tuple[int, int, bool]:
        return self.rows, self.slots, self.prefixed

    def live(self) -> list[Job]:
        return [j for j in self.jobs if j is not None]

    def target(self, shapes: Shapes, jobs: list[Job]) -> tuple[int, int, bool] | None:
        """The shape that holds the live rows and `jobs`; None while they must wait."""
        live = len(self.live()) + len(jobs)
        if live > shapes.config.max_batch:
            return None
        rows = self.rows if live <= self.rows else shapes.rows(live)
        shape = (rows, max(self.slots, *(shapes.slots(j.need) for j in jobs)),
                 self.prefixed or any(j.infos for j in jobs))
        return shape if shape[0] * shape[1] <= shapes.max_cache_tokens else None

    def shrunk(self, shapes: Shapes) -> tuple[int, int, bool] | None:
        """A smaller shape that holds the live rows (module doc), or None."""
        live = self.live()
        if not live:
            return None
        rows = shapes.rows(self.rows // 4) if len(live) <= self.rows // 4 else self.rows
        slots = max(shapes.base_slots, shapes.slots(max(j.need for j in live)))
        slots = slots if slots <= self.slots // 4 else self.slots
        return None if (rows, slots) == (self.rows, self.slots) else (rows, slots, self.prefixed)

    def relayout(self, shape: tuple[int, int, bool], relayout) -> "Pool":
        """The live rows moved into a pool of `shape`: rows packed from 0, each row's slots at
        the end of its ring, the pointer at 0 (so its next writes go to 0, 1, ...)."""
        rows, slots, prefixed = shape
        src_row = np.full((rows,), -1, np.int32)
        src_slot = np.full((rows, slots), -1, np.int32)
        jobs = self.live()
        for r, job in enumerate(jobs):
            src_row[r] = job.row
            src_slot[r, slots - len(job.slots):] = job.slots
            job.row, job.slots = r, list(range(slots - len(job.slots), slots))
        cache, prefix, counts = relayout(self.cache, self.prefix, self.counts, src_row, src_slot)
        return Pool(rows, slots, prefixed, cache, prefix, counts,
                    jobs + [None] * (rows - len(jobs)))

    def place(self, job: Job, composed: dict, reset, insert, piece) -> None:
        """Gives `job` a free row with the prefix `composed` and writes its prefilled prompt
        (`piece(c)`: keys, values [L, CHUNK, K, Dh] of its tokens c*CHUNK ..) after the slots
        its decode steps use."""
        job.row = self.jobs.index(None)
        self.jobs[job.row] = job
        self.cache, self.prefix, self.counts = reset(self.cache, self.prefix, self.counts,
                                                     np.int32(job.row), composed)
        n, base = len(job.prompt), self.pointer + job.params.max_tokens - 1
        job.slots = [(base + j) % self.slots for j in range(n)]
        for c in range(-(-n // CHUNK)):
            idx = np.arange(c * CHUNK, (c + 1) * CHUNK)
            slots = np.where(idx < n, (base + idx) % self.slots, self.slots).astype(np.int32)
            positions = np.where(idx < n, job.start + idx, -1).astype(np.int32)
            self.cache = insert(self.cache, np.int32(job.row), slots, *piece(c), positions)

    def inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """Each row's last token and its position [R] (-1: an empty row)."""
        tokens = np.zeros((self.rows,), np.int32)
        positions = np.full((self.rows,), -1, np.int32)
        for job in self.live():
            tokens[job.row] = job.tokens[-1]
            positions[job.row] = job.start + len(job.prompt) + len(job.tokens) - 1
        return tokens, positions

    def advance(self) -> None:
        """After a decode step: each live row holds the pointer's slot; the pointer moves."""
        for job in self.live():
            job.slots.append(self.pointer)
        self.pointer = (self.pointer + 1) % self.slots
