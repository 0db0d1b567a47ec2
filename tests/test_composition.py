"""Composition study helpers: curve rows, names, and the interference figure."""

import jax
import numpy as np
import pytest

from cas_jax.cartridges import attention, cartridge as cart_lib
from cas_jax.model import llama as model_lib
from cas_jax.model.loading import LoadedModel
from cas_jax.studies import composition

from test_train_collection import CFG, DOCS, _dataset


class _Cartridges:
    def __init__(self, params):
        rng = np.random.default_rng(3)
        self.table = {d: cart_lib.init_from_tokens(
            CFG, params, rng.integers(0, CFG.vocab_size, 6), fingerprint="tiny-model", doc_id=d)
            for d in DOCS}

    def get(self, doc_id):
        return self.table[doc_id]


def test_interference_is_zero_for_a_cartridge_nobody_attends_to(tmp_path):
    params = model_lib.init_params(CFG, jax.random.PRNGKey(0))
    model = LoadedModel(CFG, params, None, "tiny-model", "")
    _dataset(tmp_path / "data", np.random.default_rng(0))
    source = _Cartridges(params)
    loud = composition.interference(model, str(tmp_path / "data"), source, attention.SERIAL,
                                    seq_len=16)
    silenced = composition.interference(model, str(tmp_path / "data"), source,
                                        attention.Geometry("serial", scale=1e-30), seq_len=16)
    assert loud > 1e-4
    assert abs(silenced) < 1e-5  # positions shifted by P change nothing: RoPE is relative


def _result(correct, nll):
    return {"summary": {"gold_nll": nll},
            "records": [{"kind": "mc", "correct_ll": bool(c)} for c in correct]}


def test_curve_rows_pair_each_k_with_its_own_oracle(tmp_path):
    ones, half = np.ones(40), np.arange(40) % 2
    results = {("cas", "parallel", 0): _result(ones, 2.0), ("cas", "parallel", 3): _result(half, 2.5),
               ("naive", "serial", 3): _result(half, 3.0)}
    rows = composition.curve_rows(results)
    by = {(r["source"], r["geometry"], r["k"]): r for r in rows}
    assert by[("cas", "parallel", 0)]["minus_oracle"] is None
    diff, lo, hi = by[("cas", "parallel", 3)]["minus_oracle"]
    assert diff == -0.5 and lo <= diff <= hi
    assert by[("naive", "serial", 3)]["minus_oracle"] is None  # no k=0 row to pair with
    table = composition.format_curve(rows)
    assert "| cas | parallel | 3 | 0.500" in table and "-0.500" in table
    composition.plot_curve(rows, str(tmp_path / "c.png"), closed_book=0.3)
    assert (tmp_path / "c.png").stat().st_size > 1000
    g = attention.Geometry("parallel", temperature=0.8)
    assert composition.row_name("cas", g, 3) == "cas_parallel_temperature0.8_k3"


def test_training_scoring_and_sampling_lay_out_a_composed_request_alike():
    """One geometry, three paths: the train step's loss forward (`train.batch_prefix` and
    `batch_positions`), evaluation's scoring (`scoring.score_continuations`) and chat's
    generation (`compose_in_order` + `sampling.generate`) see the same positions and logits."""
    import jax.numpy as jnp

    from cas_jax.evaluation import scoring
    from cas_jax.model import sampling
    from cas_jax.training import train

    params = model_lib.init_params(CFG, jax.random.PRNGKey(1))
    model = LoadedModel(CFG, params, None, "tiny-model", "")
    source = _Cartridges(params)
    carts = [source.get(d) for d in ("c", "a", "f")]
    prompt = [5, 9, 2, 33, 7]
    answer = [11, 40, 3]
    tokens = np.asarray([prompt + answer], np.int32)
    for g in (attention.SERIAL, attention.PARALLEL,
              attention.Geometry("parallel", temperature=0.7, count_power=1.0)):
        keys = jnp.stack([c.keys for c in carts])
        values = jnp.stack([c.values for c in carts])
        batch = {"tokens": jnp.asarray(tokens), "selection": jnp.asarray([[0, 1, 2]]),
                 "selected": jnp.ones((1, 3), bool), "length": jnp.asarray([len(tokens[0])])}
        prefix = train.batch_prefix(keys, values, batch, g)
        start = attention.num_prefix_tokens(prefix, 1)
        assert int(start[0]) == attention.query_start([6, 6, 6], g)
        positions = train.batch_positions(batch["length"], start, tokens.shape[1])
        logits, _ = model_lib.forward(params, batch["tokens"], positions, prefix=prefix,
                                      config=CFG)
        logp = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
        want = [logp[len(prompt) - 1 + i, t] for i, t in enumerate(answer)]
        bank = attention.bank_from_cartridges(carts)
        (got,) = scoring.score_continuations(model, [prompt], [answer], bank=bank,
                                             selections=[[0, 1, 2]], slots=3, geometry=g)
        np.testing.assert_allclose(got, want, atol=1e-5)
        (greedy,) = sampling.generate(params, CFG, [prompt], sampling.SamplingParams(
            max_new_tokens=1), prefix=attention.compose_in_order(carts, g))
        assert greedy[0] == int(np.argmax(logp[len(prompt) - 1]))


def test_scoring_and_chat_route_a_composed_set_alike():
    """Under a routing geometry, evaluation's scoring (per-row biases) and chat's
    `compose_in_order(..., biases)` read the same prefix: the forward over that prefix gives
    scoring's logprobs and chat's greedy token, and the biases change them."""
    import jax.numpy as jnp

    from cas_jax.evaluation import scoring
    from cas_jax.model import sampling

    params = model_lib.init_params(CFG, jax.random.PRNGKey(1))
    model = LoadedModel(CFG, params, None, "tiny-model", "")
    source = _Cartridges(params)
    carts = [source.get(d) for d in ("c", "a", "f")]
    prompt, answer = [5, 9, 2, 33, 7], [11, 40, 3]
    g = attention.Geometry.parse("parallel,count_power=0.5,relevance=3")
    biases = [0.0, -1.5, -3.0]
    prefix = attention.compose_in_order(carts, g, biases)
    tokens = jnp.asarray([prompt + answer])
    start = attention.num_prefix_tokens(prefix, 1)
    positions = start[:, None] + jnp.arange(tokens.shape[1])[None]
    logits, _ = model_lib.forward(params, tokens, positions, prefix=prefix, config=CFG)
    logp = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
    want = [logp[len(prompt) - 1 + i, t] for i, t in enumerate(answer)]
    bank = attention.bank_from_cartridges(carts)
    (got,) = scoring.score_continuations(model, [prompt], [answer], bank=bank,
                                         selections=[[0, 1, 2]], slots=3, geometry=g,
                                         biases=[biases])
    np.testing.assert_allclose(got, want, atol=1e-5)
    (flat,) = scoring.score_continuations(model, [prompt], [answer], bank=bank,
                                          selections=[[0, 1, 2]], slots=3, geometry=g,
                                          biases=[[0.0, 0.0, 0.0]])
    assert np.abs(np.asarray(flat) - want).max() > 1e-4
    (greedy,) = sampling.generate(params, CFG, [prompt], sampling.SamplingParams(
        max_new_tokens=1), prefix=prefix)
    assert greedy[0] == int(np.argmax(logp[len(prompt) - 1]))


def test_common_geometry_is_the_one_the_cartridges_share():
    assert attention.common_geometry([]) == attention.DEFAULT_GEOMETRY
    par = "parallel,count_power=0.5"
    assert attention.common_geometry([("a", par), ("b", par)]) == attention.Geometry.parse(par)
    with pytest.raises(ValueError, match=r"different composition geometries.*'a'.*'c'"):
        attention.common_geometry([("a", par), ("b", par), ("c", "serial")])


def test_claims_results_name_the_rows_read_under_one_geometry():
    from benchmarks import cas_claims_report

    n = 40
    ones, half = np.ones(n), np.arange(n) % 2

    def res(correct, prompt=20.0, cart=0.0, hits=None):
        obj = _result(correct, 2.0)
        obj["summary"].update(prompt_tokens=prompt, cartridge_tokens=cart)
        for r, h in zip(obj["records"], hits if hits is not None else []):
            r["retrieval_hit"] = h
        return obj

    rows = {("cas", "serial", 0): res(ones), ("cas", "serial", 3): res(half),
            ("cas", "parallel", 0): res(ones), ("cas", "parallel", 3): res(ones[:-1].tolist()
                                                                           + [0.0]),
            ("cas", "parallel", 7): res(half)}
    retrieval = {("cas", "parallel", "bm25", 1): res(ones, cart=64, hits=[True] * n),
                 ("cas", "serial", "bm25", 1): res(half, cart=64, hits=[True] * n)}
    refs = {"closed_book": res(half), "icl": res(ones), "rag_bm25_k2": res(half, prompt=500)}
    table = composition.claims_results(rows, retrieval, refs, "cas",
                                       attention.Geometry("parallel"))
    assert sorted(table) == ["cas_composed_k3", "cas_composed_k7", "cas_oracle", "closed_book",
                             "icl", "rag_bm25_k2", "retrieval_cas_bm25_k1"]
    assert table["cas_composed_k3"] is rows[("cas", "parallel", 3)]  # not the serial row
    line = cas_claims_report.claims_line(table)
    # cas_oracle is the single-cartridge oracle here (no isolated one); it reads no cartridge
    # tokens in this table, so no compression.
    assert line == ("oracle_minus_icl=+0.0000 recovered_acc=1.0000 questions=40 "
                    "composed_k3_minus_oracle=-0.0250 composed_k7_minus_oracle=-0.5000 "
                    "retrieval_cas_minus_rag=+0.5000 token_ratio=5.95")
    meta = {"median_document_tokens": 640.0, "documents": 2538, "collection_tokens": 2068190}
    table["cas_oracle"]["summary"]["cartridge_tokens"] = 64.0
    assert cas_claims_report.claims_line(table, meta=meta).endswith(
        "token_ratio=5.95 documents=2538 collection_tokens=2068190")
    assert "compression=10.00 " in cas_claims_report.claims_line(table, meta=meta)
    text = composition.format_retrieval(retrieval)
    assert "| cas | parallel | bm25 | 1 | 1.000" in text and "| 1.000 | 84 |" in text
    del table["retrieval_cas_bm25_k1"]
    line = cas_claims_report.claims_line(table)  # a figure the folder cannot support is left out
    assert "retrieval_cas_minus_rag" not in line and "token_ratio" not in line
    del table["icl"]
    assert cas_claims_report.claims_line(table).startswith("questions=40 composed_k3")


def _scored(correct, nll):
    """`_result` with each record naming its question, as evaluation writes them."""
    obj = _result(correct, nll)
    for i, r in enumerate(obj["records"]):
        r.update(doc_id=f"d{i % 3}", question=f"q{i}")
    return obj


def test_versus_rows_pair_two_readings_per_k_their_mean_and_retrieval():
    n = 40
    base1, base3 = np.zeros(n), np.arange(n) % 2
    other1, other3 = np.ones(n), np.arange(n) % 2
    results = {("cas", "a", 0): _scored(np.ones(n), 1.0), ("cas", "b", 0): _scored(np.ones(n), 1.0),
               ("cas", "a", 1): _scored(base1, 2.0), ("cas", "b", 1): _scored(other1, 2.0),
               ("cas", "a", 3): _scored(base3, 2.0), ("cas", "b", 3): _scored(other3, 2.0),
               ("cas", "a", 7): _scored(base3, 2.0)}  # no b at k=7: left out
    retrieval = {("cas", "a", "bm25", 2): _scored(np.ones(n), 2.0),
                 ("cas", "b", "bm25", 2): _scored(base3, 2.0)}
    rows = composition.versus_rows(results, retrieval, "a", "b", [1, 3, 7])
    by = {r["row"]: r["diff"] for r in rows}
    assert list(by) == ["composed k=1", "composed k=3", "composed mean k=1,3",
                        "retrieval bm25 k=2"]
    assert by["composed k=1"][0] == 1.0 and by["composed k=3"] == (0.0, 0.0, 0.0)
    mean, lo, hi = by["composed mean k=1,3"]
    assert mean == 0.5 and lo == hi == 0.5  # every question gains 0.5: no spread
    assert by["retrieval bm25 k=2"][0] == -0.5
    assert "| cas | composed k=1 | +1.000 [+1.000, +1.000] |" in composition.format_versus(
        rows, "a", "b")
    shuffled = _scored(base1, 2.0)
    shuffled["records"] = shuffled["records"][::-1]
    with pytest.raises(ValueError, match="same questions"):
        composition.versus_rows({("cas", "a", 1): results[("cas", "a", 1)],
                                 ("cas", "b", 1): shuffled}, {}, "a", "b", [1])
