"""The continuous engine's jitted pieces, and their compilation off the engine's path.

The model runs only through the `Decoder` contract (`model.decoder`): `forward` and `logits`,
and, for decode steps, its optional `decode_layout` (cas_jax's own decoder: the layers
unrolled, the sampler's tuned decode path). A pool holds R rows x S KV slots per row in that
decode layout:
  cache   k, v: per layer [R, S, K, Dh] (a tuple of L such arrays, or one [L, R, S, K, Dh]
          array: the two forms serving supports); pos [R, S] int32 (-1 = empty)
  prefix  None, or k, v: per layer [R, C*P_max, K, Dh] as the cache's; mask [R, C*P_max]; and
          logit_scale / logit_bias [R, C*P_max] when the geometry reshapes prefix logits.
          Each row's is `attention.compose` of its cartridges (rows without: mask False).
  counts  [R, V] int32, tokens each row generated (frequency and presence penalties)
Every row writes its decode step's K/V at the same slot, the ring pointer (the cache's
`index`); the engine places each prompt where the pointer will not reach before the row ends
(`serving_continuous`). Prompts are prefilled in the contract's own layout.

Kernels (each compiled once per key; `Kernels.compiled` counts them):
  ("step", R, S, pfx)       one decode step of every row, per-row sampling
  ("prefill", N, T, pfx)    N prompts of T tokens (bucketed) -> their K/V in CHUNK-token
                            pieces and their first tokens
  ("chunk", C, B, pfx)      the next C tokens of one long prompt, attending to its earlier
                            chunks' K/V in a buffer of B slots (`serving_prefill`) -> the
                            buffer, the chunk's K/V in CHUNK-token pieces, a next token
  ("insert", R, S)          one chunk of a prompt's K/V into a row's slots
  ("reset", R, S, pfx)      clears a row and sets its prefix
  ("relayout", a, b)        gathers rows and slots of a pool of shape a into one of shape b
  ("compose",)              one row's prefix from the bank (`attention.compose`; under a
                            routing geometry it also takes the row's cartridge biases)
  ("put", P, dtype)         one cartridge of P tokens into a bank slot
Sampling is per row (`serving.row_sampling`), so one batch mixes temperatures and seeds.

Every XLA compile an engine makes happens on its compile thread, under `COMPILE_LOCK`: the
engine thread only runs compiled kernels and moves host arrays (`jax.device_put`), so no op of
its own compiles (XLA:CPU crashed compiling on two threads at once, BUILD_NOTES "CI").
"""

from __future__ import annotations

import collections
import functools
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cas_jax.cartridges import attention
from cas_jax.model import decoder as decoder_lib, llama as model_lib
from cas_jax.serving.cartridges import put_slot
from cas_jax.serving.engine import COMPILE_LOCK
from cas_jax.serving.row_sampling import choose

CHUNK = 64  # prompt K/V tokens per insert call


def _per_layer(f, kv, *per_layer):
    """`f` on each layer's array [R, ...] of `kv` (a tuple of L of them, or one [L, R, ...]
    array: module doc), given that layer's entry of each [L, ...] array in `per_layer`; the
    result in `kv`'s form."""
    if isinstance(kv, (tuple, list)):
        return tuple(f(a, *(x[i] for x in per_layer)) for i, a in enumerate(kv))
    return jax.vmap(f)(kv, *per_layer)


def _step(params, cache, prefix, counts, tokens, positions, pointer, rows, *, decoder):
    """One decode step (decode layout): tokens, positions [R] (-1 = idle row) -> (cache,
    counts, next tokens, logprobs, top ids, top logprobs)."""
    hidden, kv = decoder.forward(params, tokens[:, None], positions[:, None],
                                 {**cache, "index": pointer}, prefix)
    nxt, lp, top_ids, top_lp = choose(decoder.logits(params, hidden[:, 0]), counts, rows)
    live = (positions >= 0).astype(jnp.int32)
    counts = counts.at[jnp.arange(counts.shape[0]), nxt].add(live)
    return {name: kv[name] for name in cache}, counts, nxt, lp, top_ids, top_lp


def _prefill(params, tokens, positions, prefixes, last, rows, *, decoder):
    """N prompts: tokens, positions [N, T] (-1 = padding), prefixes: None or N one-row
    compositions, last [N] = index of each prompt's last token -> (keys, values: per prompt
    T / CHUNK pieces [L, CHUNK, K, Dh], first tokens, logprobs, top ids, top logprobs).
    (Pieces as separate outputs: the engine thread indexes nothing, so compiles nothing.)"""
    prefix = None if prefixes is None else {
        name: jnp.concatenate([p[name] for p in prefixes], axis=1 if name in ("k", "v") else 0)
        for name in prefixes[0]}
    hidden, kv = decoder.forward(params, tokens, positions, None, prefix)
    logits = decoder.logits(params, hidden[jnp.arange(tokens.shape[0]), last])
    first = choose(logits, jnp.zeros(logits.shape, jnp.int32), rows)
    k, v = _pieces(kv["k"]), _pieces(kv["v"])
    return (tuple(tuple(k[i]) for i in range(k.shape[0])),
            tuple(tuple(v[i]) for i in range(v.shape[0])), *first)


def _pieces(x):
    """[L, N, T, K, Dh] -> [N, T / CHUNK, L, CHUNK, K, Dh] (zero-padded), `_insert`'s pieces."""
    n_layers, n, t, kh, dh = x.shape
    x = jnp.pad(x, ((0, 0), (0, 0), (0, -t % CHUNK), (0, 0), (0, 0)))
    return jnp.moveaxis(x.reshape(n_layers, n, -1, CHUNK, kh, dh), 0, 2)


def _chunk(params, buffer, prefix, tokens, positions, index, last, rows, *, decoder):
    """The next chunk of one long prompt: tokens, positions [1, C] (-1 = padding), written at
    slots index .. index + C - 1 of `buffer` (k, v [L, 1, B, K, Dh], pos [1, B]: the prompt's
    earlier chunks, which it attends to, as it does to `prefix`, None or one row's
    composition) -> (buffer, the chunk's keys, values: C / CHUNK arrays [L, CHUNK, K, Dh]
    each, and the token after the chunk's token `last`: token, logprob, top ids, top logprobs
    [1, ...])."""
    hidden, kv = decoder.forward(params, tokens, positions, {**buffer, "index": index}, prefix)
    logits = decoder.logits(params, hidden[:, last])
    first = choose(logits, jnp.zeros(logits.shape, jnp.int32), rows)
    k, v = (jax.lax.dynamic_slice_in_dim(kv[name], index, tokens.shape[1], axis=2)
            for name in ("k", "v"))
    buffer = {name: kv[name] for name in buffer}
    return buffer, tuple(_pieces(k)[0]), tuple(_pieces(v)[0]), *first


def _insert(cache, row, slots, keys, values, positions):
    """Writes CHUNK tokens' keys, values [L, CHUNK, K, Dh] and positions [CHUNK] into row
    `row` at `slots` [CHUNK] (a slot of S or more is dropped)."""
    def write(c, new):
        return c.at[row, slots].set(new.astype(c.dtype), mode="drop")

    return {"k": _per_layer(write, cache["k"], keys), "v": _per_layer(write, cache["v"], values),
            "pos": cache["pos"].at[row, slots].set(positions, mode="drop")}


def _compose(bank, selection, selected, cartridge_bias=None, *, geometry):
    """`attention.compose` with the biases positional (a kernel's arguments)."""
    return attention.compose(bank, selection, selected, geometry, cartridge_bias)


def _reset(cache, prefix, counts, row, composed):
    """Empties row `row` and gives it the prefix `composed` (`attention.compose` of one row)."""
    cache = {**cache, "pos": cache["pos"].at[row].set(-1)}
    if prefix is not None:
        def write(a, new):
            return a.at[row].set(new.astype(a.dtype))

        prefix = {name: _per_layer(write, arrays, composed[name][:, 0]) if name in ("k", "v")
                  else write(arrays, composed[name][0]) for name, arrays in prefix.items()}
    return cache, prefix, counts.at[row].set(0)


def _relayout(cache, prefix, counts, src_row, src_slot, *, prefix_like):
    """A pool whose row r is old row src_row[r] (-1: empty) with slot j from its slot
    src_slot[r, j] (-1: empty). prefix_like: the new pool's prefix shapes (None: no prefix)."""
    ok_row = src_row >= 0
    r = jnp.maximum(src_row, 0)
    ok = (src_slot >= 0) & ok_row[:, None]
    s = jnp.maximum(src_slot, 0)

    def gather(c):
        return jnp.where(ok[:, :, None, None], c[r[:, None], s], 0).astype(c.dtype)

    new = {"k": _per_layer(gather, cache["k"]), "v": _per_layer(gather, cache["v"]),
           "pos": jnp.where(ok, cache["pos"][r[:, None], s], -1)}
    counts = jnp.where(ok_row[:, None], counts[r], 0)
    if prefix_like is None:
        return new, None, counts
    if prefix is None:
        return new, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), prefix_like), counts

    def rows_of(a):
        return jnp.where(ok_row.reshape((-1,) + (1,) * (a.ndim - 1)), a[r], 0).astype(a.dtype)

    return new, {name: _per_layer(rows_of, a) if name in ("k", "v") else rows_of(a)
                 for name, a in prefix.items()}, counts


def _decode_params(params, *, decoder):
    """The params in the decoder's decode layout (`decode_layout`'s first output)."""
    cache = model_lib.init_cache(decoder, 1, 1, decoder_lib.kv_dtype(params))
    return decoder.decode_layout(params, cache, None)[0]


def _check_layout(what: str, kv, layers: int, rows: int) -> None:
    """Refuses a decode layout whose per-layer K/V is neither form of the module doc."""
    if isinstance(kv, (tuple, list)):
        ok = len(kv) == layers and all(a.shape[:1] == (rows,) for a in kv)
    else:
        ok = kv.shape[:2] == (layers, rows)
    if not ok:
        raise ValueError(f"serving needs the decoder's decode layout to keep the {what} as "
                         f"L={layers} arrays [rows, ...] or one [L, rows, ...] array; got "
                         f"{jax.tree.map(lambda a: a.shape, kv)}")


class Kernels:
    """Compiled kernels by key (module doc), compiled on a background thread on request, so
    the engine runs what is ready while the rest compiles. `on_ready` is called (on that
    thread) after each compile. `step_params` (the params in the decode layout) are made on
    that thread before any step kernel compiles."""

    def __init__(self, model, bank: attention.CartridgeBank, max_cartridges: int,
                 geometry: attention.Geometry, on_ready: Callable[[], None]):
        self.decoder = model_lib.as_decoder(model.config)
        self.params = model.params
        self.step_params = None if hasattr(self.decoder, "decode_layout") else model.params
        self.dtype = decoder_lib.kv_dtype(model.params)
        self.geometry, self.on_ready = geometry, on_ready
        self.bank_like = jax.eval_shape(lambda b: b, bank)
        self.selection_like = jax.ShapeDtypeStruct((1, max(max_cartridges, 1)), jnp.int32)
        self.composed_like = jax.eval_shape(
            functools.partial(_compose, geometry=geometry), bank, self.selection_like,
            *self._compose_args_like())
        self._pools: dict[tuple, tuple] = {}  # pool_like's, by shape
        cache, prefix, _ = self.pool_like(1, 1, True)  # refuses a layout serving cannot hold
        layers = self.decoder.num_layers
        for what, kv in (("cache k", cache["k"]), ("cache v", cache["v"]),
                         ("prefix k", prefix["k"]), ("prefix v", prefix["v"])):
            _check_layout(what, kv, layers, 1)
        self._done: dict[tuple, Callable] = {}
        self._failed: dict[tuple, Exception] = {}
        self._queue: collections.deque[tuple] = collections.deque()
        self._cv = threading.Condition()
        self.compiled = collections.Counter()  # kind -> executables compiled
        self.compile_s = 0.0
        self._closing = False
        self._compiling = 0
        self._step_error: Exception | None = None
        self._thread = threading.Thread(target=self._loop, name="cas-serving-compile",
                                        daemon=True)
        self._thread.start()

    # -- shapes

    def pool_like(self, rows: int, slots: int, prefixed: bool):
        """Abstract (cache, prefix, counts) of a pool, in the decode layout."""
        key = (rows, slots, prefixed)
        if key not in self._pools:
            dec = self.decoder
            kv = jax.ShapeDtypeStruct((dec.num_layers, rows, slots, dec.num_kv_heads,
                                       dec.head_dim), self.dtype)
            cache = {"k": kv, "v": kv, "pos": jax.ShapeDtypeStruct((rows, slots), jnp.int32),
                     "index": jax.ShapeDtypeStruct((), jnp.int32)}
            prefix = None
            if prefixed:
                prefix = {name: jax.ShapeDtypeStruct(
                    (a.shape[0], rows) + a.shape[2:] if name in ("k", "v")
                    else (rows,) + a.shape[1:], a.dtype)
                    for name, a in self.composed_like.items() if name != "start"}
            if hasattr(dec, "decode_layout"):  # abstract: params too, so nothing runs
                _, cache, prefix = jax.eval_shape(dec.decode_layout, self.params, cache, prefix)
            cache = {name: a for name, a in cache.items() if name != "index"}
            self._pools[key] = (cache, prefix,
                                jax.ShapeDtypeStruct((rows, dec.vocab_size), jnp.int32))
        return self._pools[key]

    def empty_pool(self, rows: int, slots: int, prefixed: bool):
        """A pool with every row empty (made on the host: nothing compiles)."""
        cache, prefix, counts = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                                             self.pool_like(rows, slots, prefixed))
        cache["pos"] = np.full((rows, slots), -1, np.int32)
        return jax.device_put((cache, prefix, counts))

    def buffer_like(self, slots: int):
        """Abstract buffer of a long prompt's K/V (`_chunk`)."""
        dec = self.decoder
        kv = jax.ShapeDtypeStruct((dec.num_layers, 1, slots, dec.num_kv_heads, dec.head_dim),
                                  self.dtype)
        return {"k": kv, "v": kv, "pos": jax.ShapeDtypeStruct((1, slots), jnp.int32)}

    def empty_buffer(self, slots: int) -> dict:
        """A buffer of `slots` empty slots (made on the host)."""
        kv = self.buffer_like(slots)["k"]
        return jax.device_put({"k": np.zeros(kv.shape, kv.dtype),
                               "v": np.zeros(kv.shape, kv.dtype),
                               "pos": np.full((1, slots), -1, np.int32)})

    def _compose_args_like(self) -> tuple:
        """`attention.compose`'s arguments after the selection: the mask, and under a routing
        geometry the per-cartridge logit biases [1, C] float32."""
        like = self.selection_like
        mask = jax.ShapeDtypeStruct(like.shape, bool)
        if self.geometry.relevance > 0:
            return mask, jax.ShapeDtypeStruct(like.shape, jnp.float32)
        return (mask,)

    @staticmethod
    def rows_like(n: int):
        f32, scalar = jax.ShapeDtypeStruct((n,), jnp.float32), jax.ShapeDtypeStruct((), bool)
        return (f32, f32, f32, f32, jax.ShapeDtypeStruct((n,), jnp.uint32),
                jax.ShapeDtypeStruct((n,), jnp.int32), scalar)

    def _lower(self, key: tuple):
        kind, dec, i32 = key[0], self.decoder, jax.ShapeDtypeStruct((), jnp.int32)
        if kind == "step":
            if self.step_params is None:
                raise self._step_error
            _, r, s, pfx = key
            cache, prefix, counts = self.pool_like(r, s, pfx)
            vec = jax.ShapeDtypeStruct((r,), jnp.int32)
            fn = jax.jit(functools.partial(_step, decoder=dec), donate_argnums=(1, 3))
            return fn.lower(self.step_params, cache, prefix, counts, vec, vec, i32,
                            self.rows_like(r))
        if kind == "prefill":
            _, n, t, pfx = key
            tok = jax.ShapeDtypeStruct((n, t), jnp.int32)
            prefixes = (self.composed_like,) * n if pfx else None
            fn = jax.jit(functools.partial(_prefill, decoder=dec))
            return fn.lower(self.params, tok, tok, prefixes, jax.ShapeDtypeStruct((n,), jnp.int32),
                            self.rows_like(n))
        if kind == "chunk":
            _, c, b, pfx = key
            tok = jax.ShapeDtypeStruct((1, c), jnp.int32)
            fn = jax.jit(functools.partial(_chunk, decoder=dec), donate_argnums=1)
            return fn.lower(self.params, self.buffer_like(b), self.composed_like if pfx else None,
                            tok, tok, i32, i32, self.rows_like(1))
        if kind == "insert":
            _, r, s = key
            cache = self.pool_like(r, s, False)[0]
            kv = jax.ShapeDtypeStruct((dec.num_layers, CHUNK, dec.num_kv_heads, dec.head_dim),
                                      self.dtype)
            vec = jax.ShapeDtypeStruct((CHUNK,), jnp.int32)
            return jax.jit(_insert, donate_argnums=0).lower(cache, i32, vec, kv, kv, vec)
        if kind == "reset":
            _, r, s, pfx = key
            cache, prefix, counts = self.pool_like(r, s, pfx)
            return jax.jit(_reset, donate_argnums=(0, 1, 2)).lower(
                cache, prefix, counts, i32, self.composed_like)
        if kind == "relayout":
            _, (r, s, pfx), (r2, s2, pfx2) = key
            cache, prefix, counts = self.pool_like(r, s, pfx)
            fn = jax.jit(functools.partial(_relayout,
                                           prefix_like=self.pool_like(r2, s2, pfx2)[1]))
            return fn.lower(cache, prefix, counts, jax.ShapeDtypeStruct((r2,), jnp.int32),
                            jax.ShapeDtypeStruct((r2, s2), jnp.int32))
        if kind == "compose":
            fn = jax.jit(functools.partial(_compose, geometry=self.geometry))
            return fn.lower(self.bank_like, self.selection_like, *self._compose_args_like())
        if kind == "put":
            _, p, dtype = key
            kv = jax.ShapeDtypeStruct((dec.num_layers, p, dec.num_kv_heads, dec.head_dim),
                                      np.dtype(dtype))
            return jax.jit(put_slot, donate_argnums=0).lower(self.bank_like, i32, kv, kv)
        raise ValueError(f"unknown kernel {key!r}")

    # -- compilation

    def get(self, key: tuple) -> Callable | None:
        """The compiled kernel, or None (then it is queued to compile first). Raises the
        error its compilation failed with."""
        with self._cv:
            if key in self._failed:
                raise self._failed[key]
            fn = self._done.get(key)
            if fn is None:
                if key in self._queue:
                    self._queue.remove(key)
                self._queue.appendleft(key)
                self._cv.notify()
            return fn

    def warm(self, keys: list[tuple]) -> None:
        """Queues `keys` to compile after anything asked for by `get`."""
        with self._cv:
            self._queue.extend(k for k in keys if k not in self._done and k not in self._queue)
            self._cv.notify()

    def pending(self) -> int:
        """Kernels queued or compiling."""
        with self._cv:
            return len(self._queue) + self._compiling

    def _make_step_params(self) -> None:
        """The params in the decode layout, compiled and run here (class doc)."""
        if self.step_params is not None:
            return
        try:
            with COMPILE_LOCK:
                fn = jax.jit(functools.partial(_decode_params, decoder=self.decoder))
                step_params = fn.lower(self.params).compile()(self.params)
        except Exception as e:  # every step kernel fails with it
            self._step_error = e
        else:
            with self._cv:
                self.step_params = step_params

    def _loop(self) -> None:
        self._make_step_params()
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if self._closing:
                    return
                key = self._queue.popleft()
                if key in self._done:
                    continue
                self._compiling = 1
            t0 = time.perf_counter()
            try:
                with COMPILE_LOCK:
                    fn = self._lower(key).compile()
            except Exception as e:  # a shape that cannot compile fails its requests only
                with self._cv:
                    self._failed[key] = e
                    self._compiling = 0
            else:
                with self._cv:
                    self._done[key] = fn
                    self.compiled[key[0]] += 1
                    self.compile_s += time.perf_counter() - t0
                    self._compiling = 0
            self.on_ready()

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join()
