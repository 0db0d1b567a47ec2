"""Serving throughput and latency: cartridges against ICL, continuous against static batching.

  python -m benchmarks.serve [--engines=continuous,static] [--doc_sets=sections,profiles] \
      [--concurrency=1,8,32,64] [--docs_per_request=1,2,4] [--max_tokens=128] ...

Setup: the real embedded model; one CartridgeStore per run holding, per document set,
`--documents` first-token cartridges (`--cartridge_tokens` each, no training) of Factbook
documents: `sections` (top-level sections, each its first `--section_tokens` tokens, ~700) and
`profiles` (whole profiles, their first `--profile_tokens` tokens, ~8k). The device budget
holds `--budget_cartridges`, fewer than the store, so requests page. The server runs in this
process on 127.0.0.1 (uvicorn thread, free port), once per engine (continuous: `--max_batch`
rows; static: `--static_max_batch` rows per call, by default the old server's 16); clients
are asyncio tasks in the same process (they share its CPU).

Modes, one question for all ("Summarize what the documents say."), greedy, `--max_tokens`,
every request streamed:
  closed   no documents
  cart k   k cartridges per request, drawn uniformly from the set's store
  icl k    the same k documents' text in the prompt (a leading system message: the document
           block); cells that cannot fit the window are skipped
For each engine, set, mode and number of concurrent clients c (closed loop), max(--requests, c)
requests are timed after untimed warm-up rounds of min(c, max_batch) requests (until one
compiles nothing, at most three; `--warmup_requests`, `--warmup_rounds` cap them). Reported:
completion tokens per second of wall time, time to first content token (TTFT) p50/p90, inter-
token latency (ITL: a request's time from first to last token over its tokens - 1) p50,
end-to-end latency p50, and compiles during the timed run (continuous: kernels; static:
sampler).

Bars (`--bars`, per engine, each pattern once untimed first so its shapes are compiled): a
13-token request alone and sent 1 s into a 256-token one; one 200-token stream's first content
chunk over its total time and its chunk count; 64 clients (`--disconnect_clients`) that
disconnect mid-stream, three times (RSS before and after, requests still running after); a
short request while two clients POST 5 MB bodies in a loop (over the 1 MiB body limit), over
its time alone.

`--skip=static:icl` leaves out cells the last line does not read; `--from_log=LOG` prints
the summary of a run from its log (its rows and bars lines), e.g. of a run cut off after the
cells the last line reads.

Last line: `cartridge_vs_icl_throughput=X ttft_p50_s=Y continuous_vs_static=Z`: X = cart 1 /
icl 1 tokens/s at the last document set (profiles by default) and the largest concurrency, on
the first engine; Y = that cart 1 cell's TTFT p50; Z = first engine / static tokens/s in the
cart 1 cell of the first set at the largest concurrency.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
import tempfile
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from cas_jax.cartridges.cartridge import Cartridge, CartridgeMeta
from cas_jax.cartridges.store import CartridgeStore
from cas_jax.documents import corpus
from cas_jax.model import llama as model_lib, loading, rendering, sampling
from cas_jax.serving import server

from benchmarks import serve_report

FLAGS = flags.FLAGS
flags.DEFINE_list("engines", ["continuous", "static"], "Engines, each in its own server.")
flags.DEFINE_list("doc_sets", ["sections", "profiles"], "Document sets: sections, profiles.")
flags.DEFINE_list("concurrency", ["1", "8", "32", "64"], "Concurrent clients.")
flags.DEFINE_list("docs_per_request", ["1", "2", "4"], "Documents per request (cart and icl).")
flags.DEFINE_integer("requests", 64, "Timed requests per cell, at least the clients.")
flags.DEFINE_integer("max_tokens", 128, "Completion tokens per request (at most).")
flags.DEFINE_integer("cartridge_tokens", 256, "Tokens per cartridge.")
flags.DEFINE_integer("section_tokens", 700, "Tokens of a section document.")
flags.DEFINE_integer("profile_tokens", 7800, "Tokens of a profile document.")
flags.DEFINE_integer("documents", 128, "Documents (cartridges) per set.")
flags.DEFINE_integer("budget_cartridges", 64, "Device budget, in cartridges.")
flags.DEFINE_integer("max_batch", 64, "Continuous engine: most requests decoding at once.")
flags.DEFINE_integer("static_max_batch", 16, "Static engine: most rows per generate call "
                     "(16: the server's default before the continuous engine).")
flags.DEFINE_float("batch_wait_ms", 10.0, "Static engine: how long a request waits for others.")
flags.DEFINE_integer("warmup_requests", 0,
                     "Untimed warm-up requests per round (0: min(clients, max_batch)). The "
                     "continuous engine compiles its shapes at start-up, so a few suffice; "
                     "ICL at 8k-token documents and 64 clients is ~0.5M prefill tokens a round.")
flags.DEFINE_integer("warmup_rounds", 3, "Most untimed warm-up rounds per cell (each until "
                     "one compiles nothing; 0: none).")
flags.DEFINE_list("skip", [], "Cells left out, as ENGINE:MODE (e.g. static:icl: the static "
                  "engine's ICL cells, which the last line does not read).")
flags.DEFINE_string("from_log", "", "Print the summary (bars and last line) of an earlier run "
                    "from its log's printed rows and bars, and exit (for a run cut off after "
                    "the cells the last line reads).")
flags.DEFINE_bool("bars", True, "Also measure the issue's bars (module doc).")
flags.DEFINE_integer("disconnect_clients", 64, "Bars: clients that disconnect mid-stream.")
flags.DEFINE_integer("seed", 0, "Seed of the documents each request uses.")
flags.DEFINE_string("workdir", None, "Where to build the store (default: a temp dir, removed).")

QUESTION = "Summarize what the documents say."
_PREFILL_ROWS = 16


@dataclasses.dataclass
class Result:
    e2e: float
    ttft: float
    itl: float
    tokens: int
    chunks: int


def _documents(model, doc_set: str, n: int, seed: int) -> dict[str, str]:
    """n documents of `doc_set` with at least its tokens, each cut to them, as text."""
    r = rendering.rendering_for(model.tokenizer)
    if doc_set == "sections":
        source, length = corpus.load_factbook_sections(), FLAGS.section_tokens
    else:
        source, length = corpus.load_factbook(), FLAGS.profile_tokens
    docs = {}
    for doc in source.values():
        ids = r.document(doc.text)
        if len(ids) >= length:
            docs[f"{doc_set}:{doc.doc_id}"] = model.tokenizer.decode(ids[:length]).strip()
    if len(docs) < n:
        raise app.UsageError(f"{doc_set}: {n} documents of >= {length} tokens wanted, the "
                             f"Factbook has {len(docs)}")
    ids = np.random.default_rng(seed).choice(sorted(docs), n, replace=False)
    return {str(i): docs[i] for i in ids}


def _fill_store(store: CartridgeStore, model, docs: dict[str, str]) -> int:
    """First-token cartridges of every document; returns the bytes of one."""
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


def _bodies(mode: str, k: int, n: int, docs: dict[str, str], seed: int,
            max_tokens: int | None = None, question: str = QUESTION) -> list[dict]:
    """n request bodies of `mode`; cart k and icl k with the same seed use the same documents."""
    rng = np.random.default_rng(seed)
    ids = sorted(docs)
    out = []
    for _ in range(n):
        chosen = [str(i) for i in rng.choice(ids, k, replace=False)] if k else []
        messages = [{"role": "user", "content": question}]
        body = {"model": "bench", "max_tokens": max_tokens or FLAGS.max_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        if mode == "icl":
            messages.insert(0, {"role": "system",
                                "content": "\n\n".join(docs[i] for i in chosen)})
        elif mode == "cart":
            body["cartridges"] = [{"id": i} for i in chosen]
        out.append({**body, "messages": messages})
    return out


async def _one(http: httpx.AsyncClient, url: str, body: dict, stop_after: int = 0) -> Result:
    """Streams one request; with stop_after, disconnects after that many content chunks."""
    t0 = time.perf_counter()
    times, tokens = [], 0
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                raise RuntimeError(obj["error"]["message"])
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            if any(c["delta"].get("content") for c in obj["choices"]):
                times.append(time.perf_counter() - t0)
                if stop_after and len(times) >= stop_after:
                    break
    e2e = time.perf_counter() - t0
    itl = (times[-1] - times[0]) / (tokens - 1) if len(times) > 1 and tokens > 1 else 0.0
    return Result(e2e, times[0] if times else e2e, itl, tokens, len(times))


async def _run(url: str, bodies: list[dict], clients: int) -> tuple[float, list[Result]]:
    """Sends `bodies` from `clients` closed-loop clients; (wall s, results)."""
    queue = list(reversed(bodies))
    results = []

    async def client(http):
        while queue:
            results.append(await _one(http, url, queue.pop()))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=7200, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return time.perf_counter() - t0, results


def _compiles(engine) -> int:
    if hasattr(engine, "kernels"):
        return sum(engine.kernels.compiled.values())
    return sampling.compiled_programs()


def _fits(model, mode: str, k: int, docs: dict[str, str]) -> bool:
    """Whether an icl k request of these documents fits the window."""
    if mode != "icl":
        return True
    r = rendering.rendering_for(model.tokenizer)
    longest = max(len(r.document(t)) for t in docs.values())
    return k * longest + 64 + FLAGS.max_tokens <= model.config.max_position_embeddings


_HEADER = (f"{'engine':<11}{'docs':<9}{'mode':<8}{'clients':>8}{'requests':>9}{'tok/s':>8}"
           f"{'ttft50':>8}{'ttft90':>8}{'itl50':>8}{'e2e50':>8}{'compiles':>9}")


def _modes(ks: list[int], first_set: bool) -> list[tuple[str, int]]:
    return ([("closed", 0)] if first_set else []) + [("cart", k) for k in ks] + \
        [("icl", k) for k in ks]


def _table(url: str, engine, engine_name: str, model, docs_by_set: dict,
           results: dict) -> None:
    """Runs every (set, mode, clients) cell on one server; prints a row per cell."""
    clients = [int(c) for c in FLAGS.concurrency]
    ks = [int(k) for k in FLAGS.docs_per_request]
    for i, (doc_set, docs) in enumerate(docs_by_set.items()):
        for mode, k in _modes(ks, i == 0):
            name = mode if not k else f"{mode} {k}"
            if f"{engine_name}:{mode}" in FLAGS.skip:
                continue
            if not _fits(model, mode, k, docs):
                print(f"{engine_name:<11}{doc_set:<9}{name:<8}  skipped: over the window")
                continue
            for c in clients:
                n = max(FLAGS.requests, c)
                warm_n = FLAGS.warmup_requests or min(c, FLAGS.max_batch)
                for seed in range(FLAGS.warmup_rounds):  # until a round compiles nothing
                    compiles = _compiles(engine)
                    warm = _bodies(mode, k, warm_n, docs, 10_000 * (seed + 1) + c)
                    asyncio.run(_run(url, warm, c))
                    if _compiles(engine) == compiles:
                        break
                compiles = _compiles(engine)
                wall, res = asyncio.run(_run(url, _bodies(mode, k, n, docs, FLAGS.seed + c), c))
                cell = serve_report.Cell(sum(r.tokens for r in res) / wall,
                            *np.percentile([r.ttft for r in res], [50, 90]),
                            float(np.median([r.itl for r in res])),
                            float(np.median([r.e2e for r in res])))
                results[engine_name, doc_set, name, c] = cell
                print(f"{engine_name:<11}{doc_set:<9}{name:<8}{c:>8}{n:>9}"
                      f"{cell.tokens_per_s:>8.1f}{cell.ttft_p50:>8.2f}{cell.ttft_p90:>8.2f}"
                      f"{cell.itl_p50:>8.3f}{cell.e2e_p50:>8.2f}"
                      f"{_compiles(engine) - compiles:>9}", flush=True)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _body(question: str, max_tokens: int) -> dict:
    return {"model": "bench", "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": question}]}


SHORT = _body("What is the capital of France?", 13)
ESSAY = "Write a long, detailed essay about the history and geography of the Pacific islands."


async def _short_while_long(url: str) -> dict:
    """The pattern runs twice; the second (its shapes compiled) is reported."""
    async with httpx.AsyncClient(timeout=3600) as http:
        for _ in range(2):
            alone = (await _one(http, url, SHORT)).e2e
            long = asyncio.create_task(_one(http, url, _body(ESSAY, 256)))
            await asyncio.sleep(1.0)
            with_long = (await _one(http, url, SHORT)).e2e
            await long
    return {"short_alone_s": alone, "short_during_long_s": with_long,
            "short_ratio": with_long / alone}


async def _stream_200(url: str) -> dict:
    """Two streams; the second (its shapes compiled) is reported."""
    async with httpx.AsyncClient(timeout=3600) as http:
        for _ in range(2):
            r = await _one(http, url, _body(ESSAY, 200))
    return {"stream_tokens": r.tokens, "stream_chunks": r.chunks,
            "first_chunk_fraction": r.ttft / r.e2e, "stream_s": r.e2e}


async def _disconnects(url: str, engine, rounds: int = 3) -> dict:
    """--disconnect_clients clients stream and go away after their first content chunk, once
    untimed, then `rounds` times between two RSS readings."""
    n = FLAGS.disconnect_clients
    async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=n)) as h:
        for i in range(rounds + 1):
            if i == 1:
                before = _rss_mb()
            await asyncio.gather(*(_one(h, url, _body(ESSAY, 256), stop_after=1)
                                   for _ in range(n)))
        deadline = time.monotonic() + 120
        while engine.status().get("running", 0) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        after = (await _one(h, url, SHORT)).tokens
    return {"rss_before_mb": before, "rss_after_mb": _rss_mb(),
            "running_after": engine.status().get("running", 0), "served_after": after > 0}


async def _flood(url: str) -> dict:
    """A short request alone, then while two clients POST 5 MB bodies in a loop."""
    big = json.dumps({"model": "bench", "max_tokens": 4, "messages": [
        {"role": "user", "content": "a b " * 1310720}]}).encode()
    stop = asyncio.Event()

    async def flood():
        async with httpx.AsyncClient(timeout=3600) as http:
            while not stop.is_set():
                try:
                    await http.post(url + "/v1/chat/completions", content=big,
                                    headers={"content-type": "application/json"})
                except httpx.HTTPError:  # the server may close before reading the body
                    pass

    async with httpx.AsyncClient(timeout=3600) as http:
        alone = (await _one(http, url, SHORT)).e2e
        tasks = [asyncio.create_task(flood()) for _ in range(2)]
        await asyncio.sleep(1.0)
        during = (await _one(http, url, SHORT)).e2e
        stop.set()
        await asyncio.gather(*tasks)
    return {"short_alone_flood_s": alone, "short_during_flood_s": during,
            "flood_ratio": during / alone}


def _bars(url: str, engine) -> dict:
    out = {}
    for fn in (_short_while_long, _stream_200, _flood):
        out.update(asyncio.run(fn(url)))
    out.update(asyncio.run(_disconnects(url, engine)))
    return out


def main(_):
    if FLAGS.from_log:
        results, bars, sets, clients = serve_report.from_log(FLAGS.from_log)
        print(f"summary of {FLAGS.from_log}")
        serve_report.summary(results, bars, sets, clients)
        return
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    ks = [int(k) for k in FLAGS.docs_per_request]
    model = loading.load_model()
    workdir = tempfile.mkdtemp(prefix="cas_serve_", dir=FLAGS.workdir)
    try:
        store = CartridgeStore(workdir)
        t0 = time.perf_counter()
        docs_by_set = {s: _documents(model, s, FLAGS.documents, FLAGS.seed)
                       for s in FLAGS.doc_sets}
        per = max(_fill_store(store, model, d) for d in docs_by_set.values())
        budget = FLAGS.budget_cartridges * per
        print(f"store: {FLAGS.documents} x {list(docs_by_set)} cartridges of "
              f"{FLAGS.cartridge_tokens} tokens ({per / 1e6:.1f} MB each, made in "
              f"{time.perf_counter() - t0:.0f} s); budget {FLAGS.budget_cartridges} cartridges; "
              f"documents {FLAGS.section_tokens} / {FLAGS.profile_tokens} tokens; max_tokens "
              f"{FLAGS.max_tokens}; max_batch {FLAGS.max_batch} (static "
              f"{FLAGS.static_max_batch}); {jax.devices()[0].device_kind}")
        results, bars = {}, {}
        print("\n" + _HEADER)
        for name in FLAGS.engines:
            config = server.ServeConfig(
                engine=name, budget_bytes=budget,
                max_batch=FLAGS.static_max_batch if name == "static" else FLAGS.max_batch,
                batch_wait_ms=FLAGS.batch_wait_ms, max_cartridges=max(ks),
                max_cartridge_tokens=FLAGS.cartridge_tokens, model_id="bench",
                default_max_tokens=FLAGS.max_tokens)
            app_ = server.make_app(model, store, config)
            engine = app_.state.engine
            with server.ServerThread(app_) as s:
                t0 = time.perf_counter()
                while getattr(engine, "kernels", None) and engine.kernels.pending():
                    time.sleep(0.5)
                if name == "continuous":
                    print(f"{name:<11}start-up compiles {dict(engine.kernels.compiled)} in "
                          f"{time.perf_counter() - t0:.0f} s", flush=True)
                _table(s.url, engine, name, model, docs_by_set, results)
                if FLAGS.bars:
                    bars[name] = _bars(s.url, engine)  # printed now too: a cut-off run keeps it
                    print(serve_report.bars_line(name, bars[name]), flush=True)
                print(f"{name:<11}compiles in all: {_compiles(engine)}", flush=True)
        print()
        serve_report.summary(results, bars, list(docs_by_set),
                             max(int(x) for x in FLAGS.concurrency))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
