"""Throughput and latency of the OpenAI-compatible server: cartridges against ICL.

  python -m benchmarks.serve [--concurrency=1,4,16,64] [--docs_per_request=1,2,4] ...

Setup: the real embedded model; a fresh CartridgeStore of first-token cartridges
(`--cartridge_tokens` each, no training) of Factbook sections (`load_factbook_sections`),
`--store_factor` times larger than the device budget, which holds `--budget_batches` full
batches of distinct cartridges (max_batch x the largest docs_per_request each). Each document
is its section's first `--doc_tokens` tokens of text (whole Factbook sections make ICL cost
minutes per batch on a 2-core CPU). The server runs in this process on 127.0.0.1 (uvicorn thread, free port).

Modes, one question for all ("Summarize what the documents say."), greedy, `--max_tokens`:
  closed   no documents
  cart k   k cartridges per request, drawn uniformly from the whole store (so the budget pages)
  icl k    the same k documents' text in the prompt (a leading system message, which the
           server renders as the document block: `rendering.document` + conversation)

For each mode and each number of concurrent clients c (closed loop: each client sends its next
request when the last returns), max(--requests, c) requests are timed after an untimed warm-up
round of min(c, max_batch) requests (compiles the batch shape). Throughput: completion tokens
per second of wall time; latency: per request, end to end. `compiles` counts sampler
compilations during the timed run (0 = the warm-up covered every shape).

Defaults took 12.6 min on the project's 2-core CPU shared with other jobs (ICL at 64 clients is
most of it); `--concurrency=1,4,16 --docs_per_request=1,4` is a quicker look.

Last line: `cartridge_vs_icl_throughput=X`, tokens/s with the largest k cartridges over ICL of
the same k documents, at the largest concurrency.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from cas_jax import corpus, loading, model as model_lib, rendering, sampling, server
from cas_jax.cartridge import Cartridge, CartridgeMeta
from cas_jax.store import CartridgeStore

FLAGS = flags.FLAGS
flags.DEFINE_list("concurrency", ["1", "4", "16", "64"], "Concurrent clients.")
flags.DEFINE_list("docs_per_request", ["1", "2", "4"], "Documents per request (cart and icl).")
flags.DEFINE_integer("requests", 8, "Timed requests per (mode, clients), at least the clients.")
flags.DEFINE_integer("max_tokens", 8, "Completion tokens per request.")
flags.DEFINE_integer("cartridge_tokens", 16, "Tokens per cartridge.")
flags.DEFINE_integer("doc_tokens", 64, "Tokens of each document (its section's first tokens).")
flags.DEFINE_integer("store_factor", 10, "Store bytes over the device budget.")
flags.DEFINE_integer("budget_batches", 2, "Device budget in full batches of distinct "
                     "cartridges (2: the next batch pages in while one runs).")
flags.DEFINE_integer("max_batch", 16, "Server: most requests per generate call.")
flags.DEFINE_float("batch_wait_ms", 10.0, "Server: how long a request waits for others.")
flags.DEFINE_integer("seed", 0, "Seed of the documents each request uses.")
flags.DEFINE_string("workdir", None, "Where to build the store (default: a temp dir, removed).")

QUESTION = "Summarize what the documents say."
_PREFILL_ROWS = 64


def _documents(model, n: int, seed: int) -> dict[str, str]:
    """n Factbook sections with at least doc_tokens tokens, each cut to its first doc_tokens
    tokens of document block, as text."""
    r = rendering.rendering_for(model.tokenizer)
    docs = {}
    for doc in corpus.load_factbook_sections().values():
        ids = r.document(doc.text)
        if len(ids) >= FLAGS.doc_tokens:
            docs[doc.doc_id] = model.tokenizer.decode(ids[:FLAGS.doc_tokens]).strip()
    if len(docs) < n:
        raise app.UsageError(f"the store needs {n} sections of >= {FLAGS.doc_tokens} tokens; "
                             f"the Factbook has {len(docs)}")
    ids = np.random.default_rng(seed).choice(sorted(docs), n, replace=False)
    return {i: docs[i] for i in ids}


def _fill_store(store: CartridgeStore, model, docs: dict[str, str]) -> int:
    """First-token cartridges of every document (prefilled _PREFILL_ROWS at a time); returns
    the bytes of one cartridge."""
    r = rendering.rendering_for(model.tokenizer)
    p = FLAGS.cartridge_tokens
    ids = list(docs)
    for start in range(0, len(ids), _PREFILL_ROWS):
        chunk = ids[start:start + _PREFILL_ROWS]
        tokens = np.zeros((_PREFILL_ROWS, p), np.int32)
        for i, doc_id in enumerate(chunk):
            tokens[i] = np.resize(r.document(docs[doc_id]), p)
        positions = np.broadcast_to(np.arange(p, dtype=np.int32), tokens.shape)
        k, v = jax.device_get(model_lib.prefill_kv(model.params, jnp.asarray(tokens),
                                                   jnp.asarray(positions), config=model.config))
        for i, doc_id in enumerate(chunk):
            store.save(doc_id, Cartridge(k[:, i], v[:, i], CartridgeMeta(
                model.fingerprint, doc_id, 1, "first_tokens")))
    return 2 * k[:, 0].nbytes


def _bodies(model_id: str, mode: str, k: int, n: int, docs: dict[str, str], seed: int
            ) -> list[dict]:
    """n request bodies of `mode`; cart k and icl k with the same seed use the same documents."""
    rng = np.random.default_rng(seed)
    ids = sorted(docs)
    out = []
    for _ in range(n):
        chosen = [str(i) for i in rng.choice(ids, k, replace=False)] if k else []
        messages = [{"role": "user", "content": QUESTION}]
        body = {"model": model_id, "max_tokens": FLAGS.max_tokens, "temperature": 0}
        if mode == "icl":
            messages.insert(0, {"role": "system",
                                "content": "\n\n".join(docs[i] for i in chosen)})
        elif mode == "cart":
            body["cartridges"] = [{"id": i} for i in chosen]
        out.append({**body, "messages": messages})
    return out


async def _run(url: str, bodies: list[dict], clients: int) -> tuple[float, list[float], int]:
    """Sends `bodies` from `clients` closed-loop clients; (wall s, latencies s, tokens)."""
    queue = list(reversed(bodies))
    latencies, tokens = [], 0

    async def client(http):
        nonlocal tokens
        while queue:
            body = queue.pop()
            t0 = time.perf_counter()
            r = await http.post(url + "/v1/chat/completions", json=body)
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return time.perf_counter() - t0, latencies, tokens


def main(_):
    clients = [int(c) for c in FLAGS.concurrency]
    ks = [int(k) for k in FLAGS.docs_per_request]
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    model = loading.load_model()
    budget_cartridges = FLAGS.budget_batches * FLAGS.max_batch * max(ks)
    docs = _documents(model, FLAGS.store_factor * budget_cartridges, FLAGS.seed)
    workdir = tempfile.mkdtemp(prefix="cas_serve_", dir=FLAGS.workdir)
    try:
        store = CartridgeStore(workdir)
        t0 = time.perf_counter()
        per_cartridge = _fill_store(store, model, docs)
        budget = budget_cartridges * per_cartridge
        print(f"store: {len(docs)} cartridges x {FLAGS.cartridge_tokens} tokens "
              f"({len(docs) * per_cartridge / 1e6:.0f} MB, made in "
              f"{time.perf_counter() - t0:.0f} s); budget {budget / 1e6:.0f} MB = "
              f"{budget_cartridges} cartridges; documents {FLAGS.doc_tokens} tokens; "
              f"max_tokens {FLAGS.max_tokens}; max_batch {FLAGS.max_batch}")
        config = server.ServeConfig(budget_bytes=budget, max_batch=FLAGS.max_batch,
                                    batch_wait_ms=FLAGS.batch_wait_ms, max_cartridges=max(ks),
                                    max_cartridge_tokens=FLAGS.cartridge_tokens,
                                    model_id="bench")
        app_ = server.make_app(model, store, config)
        engine = app_.state.engine
        modes = [("closed", 0)] + [("cart", k) for k in ks] + [("icl", k) for k in ks]
        results = {}
        print(f"\n{'mode':<8}{'clients':>8}{'requests':>9}{'tok/s':>8}{'req/s':>8}"
              f"{'p50 s':>8}{'p90 s':>8}{'p99 s':>8}{'rows/call':>10}{'misses':>8}"
              f"{'compiles':>9}")
        with server.ServerThread(app_) as s:
            for mode, k in modes:
                for c in clients:
                    n = max(FLAGS.requests, c)
                    bodies = _bodies("bench", mode, k, n, docs, FLAGS.seed + c)
                    warm = _bodies("bench", mode, k, min(c, FLAGS.max_batch), docs, 10_000 + c)
                    asyncio.run(_run(s.url, warm, c))
                    compiles = sampling._generate._cache_size()
                    calls, rows = engine.batches, engine.rows
                    misses = engine.budget.stats.misses
                    wall, lat, tokens = asyncio.run(_run(s.url, bodies, c))
                    p50, p90, p99 = np.percentile(lat, [50, 90, 99])
                    name = mode if not k else f"{mode} {k}"
                    results[name, c] = tokens / wall
                    print(f"{name:<8}{c:>8}{n:>9}{tokens / wall:>8.1f}{n / wall:>8.2f}"
                          f"{p50:>8.2f}{p90:>8.2f}{p99:>8.2f}"
                          f"{(engine.rows - rows) / max(1, engine.batches - calls):>10.1f}"
                          f"{engine.budget.stats.misses - misses:>8}"
                          f"{sampling._generate._cache_size() - compiles:>9}", flush=True)
        print()
        for k in ks:
            for c in clients:
                print(f"cart {k} / icl {k} at {c} clients: "
                      f"{results[f'cart {k}', c] / results[f'icl {k}', c]:.2f}x")
        ratio = results[f"cart {max(ks)}", max(clients)] / results[f"icl {max(ks)}", max(clients)]
        print(f"cartridge_vs_icl_throughput={ratio:.3f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
