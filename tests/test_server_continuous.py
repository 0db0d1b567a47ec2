"""The continuous-batching engine (cas_jax.serving.continuous) with the tiny random model:
joining at the next step, cancellation, per-row sampling, stop strings, logprobs, compiling
off the engine's path, composition through the one geometry, and long prompts prefilled in
chunks (cas_jax.serving.prefill)."""

import concurrent.futures
import dataclasses
import os
import threading
import time

import jax
import jax.monitoring
import numpy as np
import pytest
from flax import nnx

from cas_jax.cartridges import attention, store as store_lib
from cas_jax.documents import retrieval
from cas_jax.evaluation import scoring
from cas_jax.model import rendering, sampling, tokenizer as tok_lib
from cas_jax.model.loading import LoadedModel
from cas_jax.serving import (continuous as serving_continuous, engine as serving_engine,
                             static as serving_static)
from test_own_decoder import NNXDecoder, TinyLM
from test_server import (TOKENS, WINDOW, _cartridge, _config, _user, _wait_for_warmup,  # noqa: F401
                         store, tiny)


def _engine(tiny, store, **kw):
    return serving_continuous.ContinuousEngine(tiny, store, _config(**kw))


@pytest.fixture(scope="module")
def warm(tiny, store):
    engine = _engine(tiny, store, warmup=True)
    _wait_for_warmup(engine)
    yield engine
    engine.close()


def _prompt(tiny, text):
    return rendering.rendering_for(tiny.tokenizer).conversation(_user(text))


def _greedy(n, **kw):
    return serving_engine.Sampling(max_tokens=n, temperature=0, **kw)


class _Events:
    """A listener recording (kind, payload, engine steps at the event)."""

    def __init__(self, engine):
        self.engine, self.events = engine, []
        self.started = threading.Event()

    def __call__(self, kind, payload):
        self.events.append((kind, payload, self.engine.steps))
        if kind == "start":
            self.started.set()

    def deltas(self):
        return [p for k, p, _ in self.events if k == "delta"]

    def step_of(self, kind):
        return next(s for k, _, s in self.events if k == kind)


def _solo(engine, tiny, text, params, ids=()):
    return engine.submit(_prompt(tiny, text), list(ids), params).result(120)


def test_a_request_joins_the_running_batch_at_the_next_step(warm, tiny):
    long_alone = _solo(warm, tiny, "Tell me a long story.", _greedy(100))
    short_alone = _solo(warm, tiny, "Q?", _greedy(4), ["a"])
    long_ev = _Events(warm)
    long = warm.submit(_prompt(tiny, "Tell me a long story."), [], _greedy(100), long_ev)
    while len(long_ev.deltas()) < 10:
        time.sleep(0.005)
    short_ev = _Events(warm)
    short = warm.submit(_prompt(tiny, "Q?"), ["a"], _greedy(4), short_ev)
    queued = warm.steps  # it is in the engine's inbox now (its prompt was rendered before)
    assert short.result(60).text == short_alone.text
    # Admitted before the decode step after the one running when it was queued.
    assert short_ev.step_of("start") <= queued + 1
    assert not long.future.done()  # it left while the long one kept decoding
    assert short_ev.step_of("done") - short_ev.step_of("start") == 3  # 4 tokens: prefill + 3
    assert long.result(60).text == long_alone.text  # its rows and slots were not disturbed
    assert long.result().completion_tokens == 100


def test_a_cancelled_request_frees_its_row_and_pins(warm, tiny):
    ev = _Events(warm)
    handle = warm.submit(_prompt(tiny, "Tell me a long story."), ["b"], _greedy(200), ev)
    while len(ev.deltas()) < 3:
        time.sleep(0.005)
    handle.cancel()
    with pytest.raises(serving_engine.ServeError) as e:
        handle.result(30)
    assert e.value.code == "cancelled"
    assert len(ev.deltas()) < 100
    deadline = time.monotonic() + 10
    while warm.status()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert warm.status()["running"] == 0 and warm.budget.pinned_bytes == 0
    assert _solo(warm, tiny, "Q?", _greedy(4), ["b"]).completion_tokens == 4


def test_one_batch_mixes_temperatures_top_p_and_seeds(warm, tiny):
    greedy_alone = _solo(warm, tiny, "Q1?", _greedy(24)).text
    sampled = serving_engine.Sampling(max_tokens=24, temperature=1.0, top_p=0.9, seed=7)
    first = _solo(warm, tiny, "Q2?", sampled).text
    events = [_Events(warm) for _ in range(3)]
    handles = [warm.submit(_prompt(tiny, q), [], p, ev) for q, p, ev in zip(
        ["Q1?", "Q2?", "Q3?"], [_greedy(24), sampled, serving_engine.Sampling(
            max_tokens=24, temperature=0.7, frequency_penalty=1.0)], events)]
    texts = [h.result(60).text for h in handles]
    assert texts[0] == greedy_alone  # greedy rows ignore their neighbours' sampling
    assert texts[1] == first  # a seed repeats its completion, batched or not
    assert first != _solo(warm, tiny, "Q2?", _greedy(24)).text
    starts = [ev.step_of("start") for ev in events]
    ends = [ev.step_of("done") for ev in events]
    assert max(starts) < min(ends)  # the three shared decode steps


def test_stop_strings_end_generation_where_they_appear(warm, tiny, store):
    full = _solo(warm, tiny, "Tell me.", _greedy(24), ["a"])
    ids = tok_lib.stop_token_ids(tiny.tokenizer)
    with serving_engine.COMPILE_LOCK:  # `warm` may be compiling
        tokens = sampling.generate(
            tiny.params, tiny.config, [_prompt(tiny, "Tell me.")],
            sampling.SamplingParams(max_new_tokens=24, stop_ids=tuple(ids)),
            prefix=attention.compose_in_order([store.load_cartridge("a")]))[0]
    # A stop string inside token 6's text: generation ends at token 6.
    head = tiny.tokenizer.decode(tokens[:5], skip_special_tokens=True)
    sixth = tiny.tokenizer.decode(tokens[:6], skip_special_tokens=True)[len(head):]
    assert len(sixth.strip()) >= 2, "the tiny model's 6th token is too short to cut"
    stop = sixth.strip()[:2]
    cut = full.text.find(stop)
    r = _solo(warm, tiny, "Tell me.", _greedy(24, stop=(stop,)), ["a"])
    assert r.text == full.text[:cut] and r.finish_reason == "stop"
    assert r.completion_tokens == 6  # counts only the tokens generated up to the stop
    # The static engine cut the text after generating all 24 (the defect 6).
    static = serving_static.StaticEngine(tiny, store, _config(engine="static"))
    try:
        old = static.submit(_prompt(tiny, "Tell me."), ["a"], _greedy(24, stop=(stop,)))
        assert old.result(120).text == r.text and old.result().completion_tokens == 24
    finally:
        static.close()


def test_logprobs_are_the_models(warm, tiny):
    r = _solo(warm, tiny, "Q?", _greedy(6, logprobs=True, top_logprobs=3))
    assert len(r.logprobs) == r.completion_tokens == 6
    tokens = [e.token for e in r.logprobs]
    assert tiny.tokenizer.decode(tokens) == r.text
    with serving_engine.COMPILE_LOCK:  # `warm` may be compiling
        want = scoring.score_continuations(tiny, [_prompt(tiny, "Q?")], [tokens])[0]
    for e, lp in zip(r.logprobs, want):
        assert len(e.top) == 3 and e.top[0] == (e.token, pytest.approx(e.logprob))  # greedy
        assert e.logprob == pytest.approx(float(lp), abs=1e-4)
        assert e.top[0][1] >= e.top[1][1] >= e.top[2][1]


def test_compiling_a_new_shape_does_not_stall_running_rows(tiny, store):
    engine = _engine(tiny, store)  # no warm-up: every shape compiles on first use
    try:
        _solo(engine, tiny, "Tell me a long story.", _greedy(4))
        ev = _Events(engine)
        long = engine.submit(_prompt(tiny, "Tell me a long story."), [], _greedy(200), ev)
        while len(ev.deltas()) < 3:
            time.sleep(0.005)
        compiled = sum(engine.kernels.compiled.values())
        # 300 tokens: a prompt bucket, a row bucket and a slot bucket never compiled.
        late = engine.submit(_prompt(tiny, "word " * 300), ["c"], _greedy(4))
        before = len(ev.deltas())
        late.result(120)
        assert sum(engine.kernels.compiled.values()) > compiled
        assert len(ev.deltas()) - before > 10  # the long row decoded while they compiled
        long.cancel()
    finally:
        engine.close()


@pytest.mark.parametrize("spec", ["serial", "parallel", "parallel,temperature=0.8,count_power=1"])
def test_composed_requests_read_cartridges_as_scoring_does(tiny, store, spec):
    """The server lays out composed cartridges exactly as training and evaluation do: its
    greedy tokens are sampling.generate's with attention.compose under the same geometry, and
    its logprobs are scoring's."""
    geometry = attention.Geometry.parse(spec)
    engine = _engine(tiny, store, geometry=geometry)
    ids = ["b", "a"]
    cartridges = [store.load_cartridge(i) for i in ids]
    prompt = _prompt(tiny, "What is the value of item a?")
    try:
        r = engine.submit(prompt, ids, _greedy(12, logprobs=True)).result(120)
    finally:
        engine.close()
    stops = tuple(tok_lib.stop_token_ids(tiny.tokenizer))
    (want,) = sampling.generate(tiny.params, tiny.config, [prompt], sampling.SamplingParams(
        max_new_tokens=12, stop_ids=stops), prefix=attention.compose_in_order(cartridges,
                                                                               geometry))
    tokens = [e.token for e in r.logprobs]
    assert tokens == want
    (lp,) = scoring.score_continuations(
        tiny, [prompt], [tokens], bank=attention.bank_from_cartridges(cartridges),
        selections=[[0, 1]], slots=2, geometry=geometry)
    error = np.abs(np.asarray([e.logprob for e in r.logprobs]) - lp).max()
    assert r.cartridge_tokens == TOKENS["a"] + TOKENS["b"] - 1
    other = attention.Geometry.parse("parallel" if spec == "serial" else "serial")
    (lp_other,) = scoring.score_continuations(
        tiny, [prompt], [tokens], bank=attention.bank_from_cartridges(cartridges),
        selections=[[0, 1]], slots=2, geometry=other)
    # The tiny random model's logits barely depend on the prefix; still, the other geometry
    # is 10x further from the server's numbers than scoring under its own geometry.
    assert error < 2e-5 and np.abs(np.asarray(lp_other) - lp).max() > 10 * error, error


ROUTED_DOCS = {"a": "Zorbania is a small country. The capital of Zorbania is Quillton.",
               "b": "Vexland trades in the vex crown, its currency, along the river Tarn.",
               "plinth": "Plinth is a mountain town known for its granite quarries."}


@pytest.mark.parametrize("engine", ["continuous", "static"])
def test_routed_requests_read_cartridges_as_evaluation_routes(tiny, store, engine):
    """Under a routing geometry the server biases a request's cartridges by their documents'
    relevance to its question (`retrieval.Router`, as the evaluator routes): greedy tokens
    and logprobs are scoring's with those biases, and not the unrouted reading's."""
    geometry = attention.Geometry.parse("parallel,count_power=0.5,relevance=4")
    make = serving_continuous.ContinuousEngine if engine == "continuous" \
        else serving_static.StaticEngine
    server = make(tiny, store, _config(engine=engine, geometry=geometry, documents=ROUTED_DOCS))
    ids, question = ["b", "a"], "What is the capital of Zorbania?"
    prompt = _prompt(tiny, question)
    params = _greedy(12, logprobs=engine == "continuous")
    try:
        r = server.submit(prompt, ids, params, query=question).result(120)
        with pytest.raises(serving_engine.ServeError, match="no document to route by.*'c'"):
            server.submit(prompt, ["c", "a"], params, query=question)  # c: no document here
    finally:
        server.close()
    router = retrieval.Router(retrieval.make_retriever("bm25", ROUTED_DOCS), list(ROUTED_DOCS))
    biases = router.biases(question, ids, geometry.relevance)
    assert biases == [-4.0, 0.0]  # b shares no word with the question
    cartridges = [store.load_cartridge(i) for i in ids]
    with serving_engine.COMPILE_LOCK:
        (want,) = sampling.generate(
            tiny.params, tiny.config, [prompt], sampling.SamplingParams(
                max_new_tokens=12, stop_ids=tuple(tok_lib.stop_token_ids(tiny.tokenizer))),
            prefix=attention.compose_in_order(cartridges, geometry, biases))
    stops = set(tok_lib.stop_token_ids(tiny.tokenizer))
    kept = want[:next((i for i, t in enumerate(want) if t in stops), len(want))]
    assert r.text == tiny.tokenizer.decode(kept)
    if engine == "static":
        return
    assert [e.token for e in r.logprobs] == kept
    bank = attention.bank_from_cartridges(cartridges)
    with serving_engine.COMPILE_LOCK:
        (lp,) = scoring.score_continuations(tiny, [prompt], [kept], bank=bank,
                                            selections=[[0, 1]], slots=2, geometry=geometry,
                                            biases=[biases])
        (plain,) = scoring.score_continuations(
            tiny, [prompt], [kept], bank=bank, selections=[[0, 1]], slots=2,
            geometry=attention.Geometry.parse("parallel,count_power=0.5"))
    error = np.abs(np.asarray([e.logprob for e in r.logprobs]) - lp).max()
    assert error < 2e-5 and np.abs(np.asarray(plain) - lp).max() > 10 * error, error


def test_a_request_waiting_for_the_budget_is_passed_by_one_that_fits(warm, tiny):
    """The budget holds b + c: while they are pinned, a request for a waits, and a later one
    for b (already resident) joins at once."""
    long_ev, wait_ev, fit_ev = _Events(warm), _Events(warm), _Events(warm)
    long = warm.submit(_prompt(tiny, "Tell me a long story."), ["b", "c"], _greedy(100),
                       long_ev)
    while len(long_ev.deltas()) < 5:
        time.sleep(0.005)
    waiting = warm.submit(_prompt(tiny, "Q?"), ["a"], _greedy(4), wait_ev)
    fits = warm.submit(_prompt(tiny, "Q?"), ["b"], _greedy(4), fit_ev)
    fits.result(60)
    assert not long.future.done()
    waiting.result(60)
    assert wait_ev.step_of("start") >= long_ev.step_of("done") > fit_ev.step_of("done")


def test_the_server_composes_by_the_geometry_its_cartridges_were_trained_under(tiny, tmp_path):
    par = attention.Geometry.parse("parallel,count_power=0.5")
    s = store_lib.CartridgeStore(str(tmp_path / "store"))
    for doc_id in ("x", "y"):
        c = _cartridge(tiny, doc_id, 8)
        s.save(doc_id, c.replace(meta=dataclasses.replace(c.meta, geometry=str(par))))
    engine = _engine(tiny, s)  # ServeConfig.geometry None: the cartridges' own
    try:
        assert engine.catalogue.geometry == par and engine.config.geometry == par
        engine.catalogue.check_request(4, ["x", "y"], 4)
    finally:
        engine.close()
    serial = _engine(tiny, s, geometry=attention.SERIAL)  # an explicit choice overrides
    try:
        assert serial.catalogue.geometry == attention.SERIAL
        serial.catalogue.check_request(4, ["x", "y"], 4)
    finally:
        serial.close()
    routed = attention.Geometry.parse("parallel,relevance=2")
    with pytest.raises(ValueError, match="routes by relevance.*records none.*--documents"):
        _engine(tiny, s, geometry=routed)
    s.save_document("x", ROUTED_DOCS["a"])  # what training records (initialise_store)
    s.save_document("y", ROUTED_DOCS["b"])
    engine = _engine(tiny, s, geometry=routed)  # no --documents: the store's own texts
    try:
        assert engine.catalogue.routing == {"router": "bm25", "documents": 2, "from": "store"}
        assert engine.catalogue.biases("What is the capital of Zorbania?", ["y", "x"]) == (
            -2.0, 0.0)
    finally:
        engine.close()
    with open(s.document_path("w"), "wb") as f:
        f.write(b"\xff not text")
    with pytest.raises(ValueError, match=r"documents cannot be routed by.*w\.txt.*not UTF-8"):
        _engine(tiny, s, geometry=routed)  # refused at start-up (the launcher's one-line error)
    os.remove(s.document_path("w"))
    s.save("z", _cartridge(tiny, "z", 8))  # trained under the default, serial
    with pytest.raises(ValueError, match=r"different composition geometries.*'z'"):
        _engine(tiny, s)


# ---------------------------------------------------------------- chunked prefill

CHUNK = 64  # the smallest prefill_chunk (kernels.CHUNK)
SAMPLED = serving_engine.Sampling(max_tokens=8, temperature=1.0, top_p=0.9, seed=3,
                                  logprobs=True)


@pytest.mark.parametrize("spec,requests", [
    ("serial", [([], _greedy(8, logprobs=True)), (["b", "a"], _greedy(8, logprobs=True)),
                (["a"], SAMPLED)]),
    ("parallel,temperature=0.8,count_power=1", [(["b", "a"], _greedy(8, logprobs=True))])])
def test_a_prompt_prefilled_in_chunks_answers_as_a_whole_one(tiny, store, spec, requests):
    """Greedy tokens, sampled tokens (seeded) and logprobs, with and without cartridges
    composed under the geometry (a parallel one with reshaped logits): prefill_chunk=64 (three
    chunks, the last partial) against 512 (the whole prompt in one call)."""
    prompt = _prompt(tiny, "word " * 140)
    assert 2 * CHUNK < len(prompt) < 3 * CHUNK
    got = {}
    for chunk in (CHUNK, 512):
        engine = _engine(tiny, store, geometry=attention.Geometry.parse(spec),
                         prefill_chunk=chunk)
        try:
            got[chunk] = [engine.submit(prompt, ids, p).result(120) for ids, p in requests]
            compiled = dict(engine.kernels.compiled)
        finally:
            engine.close()
        # The chunked engine compiled chunk kernels (one per cartridge presence), no prefill.
        kinds = {bool(ids) for ids, _ in requests}
        assert (compiled.get("chunk", 0), compiled.get("prefill", 0)) == (
            (len(kinds), 0) if chunk == CHUNK else (0, len(kinds))), compiled
    for (ids, _), chunked, whole in zip(requests, got[CHUNK], got[512]):
        assert [e.token for e in chunked.logprobs] == [e.token for e in whole.logprobs], ids
        assert chunked.text == whole.text and chunked.completion_tokens == 8
        for a, b in zip(chunked.logprobs, whole.logprobs):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5), ids


def _short_then_long(engine, tiny, long_prompt):
    """A short request decodes, a long one arrives: (their events, the engine's steps when the
    long one was queued)."""
    short_ev, long_ev = _Events(engine), _Events(engine)
    # Logprobs: a delta at every step. max_tokens: the long row's slot bucket (512), so
    # the pool keeps one slot bucket and the runs after the first compile nothing.
    short = engine.submit(_prompt(tiny, "Tell me a long story."), ["a"],
                          _greedy(440, logprobs=True), short_ev)
    while len(short_ev.deltas()) < 3:
        time.sleep(0.005)
    queued = engine.steps
    engine.submit(long_prompt, ["b"], _greedy(4), long_ev).result(120)
    short.cancel()  # (it may have finished while the first run compiled)
    concurrent.futures.wait([short.future], 120)
    return short_ev, long_ev, queued


def test_running_rows_decode_between_the_chunks_of_a_long_prompt(tiny, store):
    """A short request decodes; a prompt of five chunks arrives: one chunk per engine
    iteration, each followed by a decode step that gives the short row a token, and the long
    request starts at its last chunk. (Whole, it starts at the next step.) Observed in a run
    that compiled nothing, so no step counted is a wait for a compile."""
    engine = _engine(tiny, store, prefill_chunk=CHUNK)
    long_prompt = _prompt(tiny, "word " * 280)
    chunks = -(-len(long_prompt) // CHUNK)
    assert chunks == 5
    try:
        for _ in range(3):  # until a run in which nothing compiled (the first ones compile)
            compiled = sum(engine.kernels.compiled.values())
            short_ev, long_ev, queued = _short_then_long(engine, tiny, long_prompt)
            _wait_for_warmup(engine)  # what it asked for compiles now, not in the next run
            if sum(engine.kernels.compiled.values()) == compiled:
                break
        else:
            pytest.fail(f"kernels still compiled in the 3rd run: {engine.kernels.compiled}")
        started = long_ev.step_of("start")
        # Chunk 1 in the iteration that admits it, chunk 5 (and the row) four steps later; the
        # engine may have been one step further on than `queued` when the request arrived.
        assert chunks - 1 <= started - queued <= chunks + 1, (queued, started)
        during = [s for k, _, s in short_ev.events if k == "delta" and queued < s <= started]
        assert len(during) >= chunks - 1, during
        status = engine.status()
        assert status["prefilling"] is None
        assert status["compiles"]["chunk"] == 1  # one buffer bucket, with cartridges
    finally:
        engine.close()


# ---------------------------------------------------------------- where XLA compiles

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # jax's event, per compile


def test_every_compile_runs_on_the_compile_thread(tiny, store):
    """XLA:CPU crashed (SIGSEGV/SIGABRT in backend_compile_and_load) while the compile thread
    and the engine thread compiled at once (BUILD_NOTES, "CI"). Every compile an engine makes
    (its kernels, the composition, bank writes, empty pools and buffers, any eager array op)
    runs on its compile thread, one at a time: jax's backend-compile spans, recorded from the
    engine's construction to its close, over requests with and without cartridges, a prompt
    prefilled in chunks, a pool that grows and one that starts afresh."""
    spans = []

    def listener(event, start, end, **kw):
        if event == BACKEND_COMPILE:
            spans.append((threading.current_thread().name, start, end, kw.get("fun_name")))

    jax.clear_caches()  # eager ops compile again, as in a fresh process
    jax.monitoring.register_event_time_span_listener(listener)
    try:
        engine = _engine(tiny, store, prefill_chunk=CHUNK)
        try:
            first = engine.submit(_prompt(tiny, "Tell me a long story."), ["a"], _greedy(40))
            time.sleep(0.5)
            more = [engine.submit(_prompt(tiny, q), ids, p) for q, ids, p in [
                ("Q?", [], _greedy(6)), ("word " * 140, ["b"], _greedy(4)),
                ("Q2?", ["b", "a"], serving_engine.Sampling(max_tokens=6, temperature=1.0,
                                                            top_p=0.9, seed=1, logprobs=True,
                                                            top_logprobs=2))]]
            for h in [first] + more:
                h.result(300)
            _wait_for_warmup(engine)
            _solo(engine, tiny, "Q3?", _greedy(4), ["c"])  # a new pool, after the idle drop
            _wait_for_warmup(engine)
        finally:
            engine.close()
    finally:
        jax.monitoring.unregister_event_time_span_listener(listener)
    elsewhere = sorted({(name, fun) for name, _, _, fun in spans
                        if name != "cas-serving-compile"})
    assert len(spans) > 5 and not elsewhere, elsewhere


# ---------------------------------------------------------------- another decoder


def test_it_serves_a_decoder_that_is_not_cas_jaxs(tokenizer, tmp_path):
    """The server runs its model only through the `Decoder` contract: the Flax NNX decoder of
    tests/test_own_decoder.py (no decode_layout, so its pool keeps [L, R, S, K, Dh] arrays),
    over the real tokenizer, answers requests with two cartridges composed under a reshaped
    parallel geometry, one cartridge, none, and a prompt prefilled in chunks, with
    the greedy tokens of `sampling.generate` for the same prompt and cartridges, and scoring's
    logprobs."""
    graphdef, params = nnx.split(TinyLM(nnx.Rngs(2), vocab=len(tokenizer)))
    dec = NNXDecoder(graphdef, vocab_size=len(tokenizer), max_position_embeddings=WINDOW)
    model = LoadedModel(config=dec, params=params, tokenizer=tokenizer, fingerprint="own",
                        path="")
    geometry = attention.Geometry.parse("parallel,temperature=0.8,count_power=1")
    s = store_lib.CartridgeStore(str(tmp_path / "store"))
    for doc_id, n in (("x", 8), ("y", 12)):
        c = _cartridge(model, doc_id, n)
        s.save(doc_id, c.replace(meta=dataclasses.replace(c.meta, geometry=str(geometry))))
    question = _prompt(model, "What is the value of item x?")
    requests = [(question, ["y", "x"]), (question, ["x"]), (question, []),
                (_prompt(model, "word " * 140), ["y"])]
    engine = _engine(model, s, prefill_chunk=CHUNK)
    try:
        assert engine.config.geometry == geometry
        assert not isinstance(engine.kernels.pool_like(1, 128, True)[0]["k"], tuple)
        handles = [engine.submit(p, ids, _greedy(8, logprobs=True)) for p, ids in requests]
        results = [h.result(300) for h in handles]
        assert engine.kernels.compiled["chunk"] == 1
    finally:
        engine.close()
    stops = tuple(tok_lib.stop_token_ids(tokenizer))
    for (prompt, ids), r in zip(requests, results):
        cartridges = [s.load_cartridge(i) for i in ids]
        prefix = attention.compose_in_order(cartridges, geometry) if ids else None
        (want,) = sampling.generate(params, dec, [prompt], sampling.SamplingParams(
            max_new_tokens=8, stop_ids=stops), prefix=prefix)
        tokens = [e.token for e in r.logprobs]
        assert tokens == [t for t in want if t not in stops], ids  # (no logprob for a stop)
    (lp,) = scoring.score_continuations(
        model, [question], [[e.token for e in results[0].logprobs]],
        bank=attention.bank_from_cartridges([s.load_cartridge(i) for i in ("y", "x")]),
        selections=[[0, 1]], slots=2, geometry=geometry)
    np.testing.assert_allclose([e.logprob for e in results[0].logprobs], lp, atol=1e-4)
