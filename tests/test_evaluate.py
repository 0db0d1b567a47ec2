from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from cas_jax.cartridges import attention
from cas_jax.cartridges.cartridge import Cartridge, CartridgeMeta
from cas_jax.documents.corpus import Collection, Document
from cas_jax.evaluation import evaluate as ev, prompts, results as results_lib, scoring
from cas_jax.evaluation.questions import Question, read_questions
from cas_jax.model import llama as model_lib, loading
from conftest import tiny_model

FINGERPRINT = "tiny-test"
DOCS = Collection([
    Document("zo", "Zorbania", "Zorbania is a small republic. The capital of Zorbania is Quillton. "
             "Its national animal is the marsh heron. " * 6),
    Document("ve", "Vexland", "Vexland is an island kingdom. The highest point of Vexland is Mount "
             "Brel, and its currency is the vex crown. " * 4),
    Document("ta", "Tarmesh",
             "Tarmesh is a desert federation whose largest river is the Olun. " * 5),
])
MC = Question("zo", "What is the capital of Zorbania?", "Quillton",
              options=("Paris", "Quillton", "Tokyo", "Rome"), answer=1)
FREE = Question("ve", "What is the highest point of Vexland?", "Mount Brel")


def _tiny(**overrides) -> loading.LoadedModel:
    """conftest's tiny model with tied embeddings (unless overridden)."""
    return tiny_model(FINGERPRINT, "tiny", **{"tie_embeddings": True, **overrides})


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def _kv_cartridge(model, tokens, doc_id) -> Cartridge:
    k, v = model_lib.prefill_kv(model.params, jnp.asarray([tokens]),
                                jnp.arange(len(tokens))[None, :], config=model.config)
    return Cartridge(k[:, 0], v[:, 0], CartridgeMeta(FINGERPRINT, doc_id))


def _first_tokens(model, doc_id, n=24) -> Cartridge:
    ids = model.tokenizer.encode(DOCS[doc_id].text, add_special_tokens=False)[:n]
    return _kv_cartridge(model, ids, doc_id)


def test_prompt_lists_options_and_keeps_the_query_whatever_the_context(tokenizer):
    text = prompts.question_text(MC, list_options=True)
    assert "A. Paris\nB. Quillton\nC. Tokyo\nD. Rome" in text and prompts.MC_INSTRUCTION in text
    assert prompts.question_text(MC) == MC.question and prompts.question_text(FREE) == FREE.question
    bare = prompts.build_prompt(tokenizer, MC, list_options=True)
    with_doc = prompts.build_prompt(tokenizer, MC, [("Zorbania", "Some text.")], list_options=True)
    assert bare.context == [] and with_doc.query == bare.query
    # The one rendering: the document block, then the question turn with no system turn
    # (SmolLM2's template would insert its default one) in between.
    assert tokenizer.decode(with_doc.context) == "Zorbania\nSome text.\n"
    assert tokenizer.decode(bare.query).startswith("<|im_start|>user\n")
    assert "system" not in tokenizer.decode(with_doc.context + with_doc.query)


def test_parse_choice_and_answer_match():
    options = ("Paris", "New Paris", "Tokyo", "Rome")
    assert prompts.parse_choice("C", options) == 2
    assert prompts.parse_choice("(B) New Paris", options) == 1
    assert prompts.parse_choice("D. Rome", options) == 3
    assert prompts.parse_choice("The capital is new paris.", options) == 1  # longest match wins
    assert prompts.parse_choice("A country far away", options) is None  # "A" is not a letter choice
    assert prompts.parse_choice("I think the answer is C", options) == 2
    assert prompts.answer_matches("It is Mount Brel, 2,100 m.", "mount brel")
    assert not prompts.answer_matches("Mount Brelton", "Mount Brel")


def test_fit_context_cuts_to_the_budget(tokenizer):
    text = " ".join(f"word{i}" for i in range(400))
    block, dropped = prompts.fit_context(tokenizer, [("T", text)], 200)
    assert len(block) <= 200 and len(block) > 190 and dropped > 0
    whole, none = prompts.fit_context(tokenizer, [("T", "short")], 200)
    short = prompts.build_prompt(tokenizer, MC, [("T", "short")])
    assert none == 0 and whole == short.context
    two, dropped2 = prompts.fit_context(tokenizer, [("T", "short"), ("U", text)], 100)
    assert len(two) <= 100 and dropped2 == len(tokenizer.encode(text, add_special_tokens=False))


def test_loglik_picks_the_option_the_model_was_made_to_prefer(tokenizer):
    """A model whose head boosts only "Rome" (and " Rome" a bit more, so greedy generation
    writes " Rome Rome ...") must pick Rome, by log-likelihood (mean and sum, options listed or
    not) and by generation."""
    model = _tiny(tie_embeddings=False)
    params = model.params
    layers = dict(params["layers"], o=jnp.zeros_like(params["layers"]["o"]),
                  down=jnp.zeros_like(params["layers"]["down"]))
    embed = params["embed"].at[:, 0].set(1.0)  # hidden dim 0 is large and positive everywhere
    (rome,) = tokenizer.encode("Rome", add_special_tokens=False)
    (space_rome,) = tokenizer.encode(" Rome", add_special_tokens=False)
    head = jnp.zeros_like(params["lm_head"]).at[0, rome].set(4.0).at[0, space_rome].set(5.0)
    model = loading.LoadedModel(model.config, dict(params, layers=layers, embed=embed,
                                                   lm_head=head), tokenizer, FINGERPRINT, "rigged")
    questions = [MC, Question("zo", "Which city?", "Rome", options=("Paris", "Rome"), answer=1)]
    for score, listed in (("mean", False), ("sum", True)):
        config = ev.EvalConfig(option_score=score, list_options=listed, max_new_tokens=4)
        result = ev.Evaluator(model, DOCS, config).closed_book(questions)
        assert [r["prediction_ll"] for r in result.records] == [3, 1]
        assert result.accuracy_ll == 0.5
        assert [r["prediction_gen"] for r in result.records] == [3, 1]
        assert result.accuracy_gen == 0.5
        assert result.records[1]["gold_nll"] + 10 < result.records[0]["gold_nll"]


def test_handwritten_question_file_with_free_answers(tiny, tmp_path):
    path = tmp_path / "mine.jsonl"
    lines = [
        {"doc_id": "ve", "question": "What is the highest point of Vexland?", "gold": "Mount Brel"},
        {"doc_id": "ta", "question": "Name the largest river of Tarmesh.", "gold": "Olun",
         "note": "extra keys are ignored"},
        {"doc_id": "zo", "question": "What is the capital of Zorbania?",
         "options": ["Quillton", "Oslo", "Lima"], "answer": 0},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    questions = read_questions(path)
    evaluator = ev.Evaluator(tiny, DOCS, ev.EvalConfig(max_new_tokens=4))
    results = [evaluator.closed_book(questions), evaluator.icl(questions)]
    for r in results:
        assert (r.num_questions, r.num_mc, len(r.records)) == (3, 1, 3)
        assert r.accuracy_ll in (0.0, 1.0) and r.free_match is not None
        assert np.isfinite(r.gold_nll) and r.gold_nll > 0
        assert all(isinstance(rec["generation"], str) for rec in r.records)
        assert r.accuracy == r.accuracy_ll
    md, js = results_lib.write_report(results, str(tmp_path / "out"))
    table = open(md).read()
    assert table == results_lib.format_table(results) + "\n" and "| icl | 3 |" in table
    assert "acc (gen)" not in table  # near 0 with a 135M model: shown only when asked
    shown = results_lib.format_table(results, generation=True).splitlines()
    assert "| acc (LL) | acc (gen) | free match |" in shown[0]
    assert len(shown[2].split("|")) == len(table.splitlines()[2].split("|")) + 1
    saved = json.load(open(js))
    assert [m["method"] for m in saved["methods"]] == ["closed_book", "icl"]
    assert saved["records"]["icl"][0]["gold"] == "Mount Brel"


def test_prompt_tokens_and_kv_bytes(tiny):
    evaluator = ev.Evaluator(tiny, DOCS, ev.EvalConfig(max_new_tokens=0, chunk_tokens=32))
    questions = [MC, FREE]
    closed = evaluator.closed_book(questions)
    icl = evaluator.icl(questions)
    rag = evaluator.rag(questions, top_k=1)
    source = {d: _first_tokens(tiny, d) for d in DOCS}
    oracle = evaluator.oracle_cartridge(questions, source)
    both = evaluator.cartridges(questions, source, lambda q: ["zo", "ve"], name="two")
    bpt = tiny.config.kv_bytes_per_token
    queries = [len(prompts.build_prompt(tiny.tokenizer, q).query) for q in questions]
    assert closed.prompt_tokens == np.mean(queries) and closed.context_tokens == 0
    assert closed.kv_bytes == closed.prompt_tokens * bpt
    assert icl.prompt_tokens > closed.prompt_tokens and icl.context_tokens > 0
    assert icl.prompt_tokens == closed.prompt_tokens + icl.context_tokens
    assert icl.kv_bytes == icl.prompt_tokens * bpt and icl.truncated == 0
    assert 0 < rag.context_tokens < icl.context_tokens and rag.retrieval_recall == 1.0
    for r, cart in ((oracle, 24), (both, 2 * 24 - 1)):  # composition keeps one sink
        assert r.context_tokens == 0 and r.prompt_tokens == closed.prompt_tokens
        assert r.cartridge_tokens == cart
        assert r.kv_bytes == (r.prompt_tokens + cart) * bpt
    assert closed.accuracy_gen is None and closed.free_match is None  # generation off


def test_icl_truncation_is_reported(tiny):
    evaluator = ev.Evaluator(tiny, DOCS, ev.EvalConfig(window=128, max_new_tokens=0))
    result = evaluator.icl([MC])
    assert result.truncated == 1 and result.truncated_tokens > 0
    assert result.prompt_tokens + 4 <= 128  # context + query + the answer fit the window


def test_retrieval_cartridges_do_not_recompile_when_k_changes(tiny):
    evaluator = ev.Evaluator(tiny, DOCS, ev.EvalConfig(max_new_tokens=4))
    source = {d: _first_tokens(tiny, d, n=16 + 4 * i) for i, d in enumerate(DOCS)}
    questions = [MC, FREE, Question("ta", "What is the largest river of Tarmesh?", "Olun")]
    one = evaluator.retrieval_cartridges(questions, source, top_k=1, slots=3)
    assert one.compilations > 0 and one.retrieval_recall == 1.0
    two = evaluator.retrieval_cartridges(questions, source, top_k=2, slots=3)
    three = evaluator.retrieval_cartridges(questions, source, top_k=3, slots=3)
    assert two.compilations == 0 and three.compilations == 0
    assert one.cartridge_tokens < two.cartridge_tokens < three.cartridge_tokens
    assert all(len(r["retrieved"]) == 2 for r in two.records)


def test_context_as_prefix_equals_context_tokens_in_the_sequence(tiny):
    """Forward level: a context's K/V as the prefix gives the log-probs of its tokens inline."""
    built = [prompts.build_prompt(tiny.tokenizer, q, [(DOCS[q.doc_id].title, DOCS[q.doc_id].text)])
             for q in (MC, FREE)]
    conts = [tiny.tokenizer.encode(a, add_special_tokens=False) for a in ("Quillton", "Mount Brel")]
    inline = scoring.score_continuations(tiny, [p.context + p.query for p in built], conts)
    for cartridges in (scoring.prefill_contexts(tiny, [p.context for p in built], ["a", "b"],
                                           chunk_tokens=64),
                       [_kv_cartridge(tiny, p.context, n) for p, n in zip(built, "ab")]):
        bank = attention.bank_from_cartridges(cartridges)
        prefixed = scoring.score_continuations(tiny, [p.query for p in built], conts, bank=bank,
                                          selections=[[0], [1]])
        for x, y in zip(inline, prefixed):
            np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-4)


def test_oracle_cartridge_of_the_document_kv_equals_icl(tiny):
    """Method level: a cartridge holding the exact K/V of ICL's context turn (the document at the
    start of the sequence) gives ICL's option log-likelihoods and gold NLL."""
    questions = [MC, FREE]
    evaluator = ev.Evaluator(tiny, DOCS, ev.EvalConfig(max_new_tokens=0))
    icl = evaluator.icl(questions)
    source = {d: _kv_cartridge(tiny, prompts.build_prompt(
        tiny.tokenizer, MC, [(DOCS[d].title, DOCS[d].text)]).context, d) for d in DOCS}
    oracle = evaluator.oracle_cartridge(questions, source)
    np.testing.assert_allclose(oracle.records[0]["option_logprobs"],
                               icl.records[0]["option_logprobs"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose([r["gold_nll"] for r in oracle.records],
                               [r["gold_nll"] for r in icl.records], atol=1e-4, rtol=1e-4)
    assert oracle.cartridge_tokens == icl.context_tokens


@pytest.mark.slow
def test_smollm_icl_beats_closed_book_on_facts_in_the_document(smollm):
    questions = [
        MC,
        Question("ve", "What is the highest point of Vexland?", "Mount Brel",
                 options=("Mount Kosciuszko", "Mount Brel", "Ben Nevis", "Mont Blanc"), answer=1),
        Question("ta", "What is the largest river of Tarmesh?", "Olun",
                 options=("Nile", "Danube", "Olun", "Amazon"), answer=2),
    ]
    evaluator = ev.Evaluator(smollm, DOCS, ev.EvalConfig(max_new_tokens=16, window=1024))
    closed, icl = evaluator.closed_book(questions), evaluator.icl(questions)
    assert icl.accuracy_ll == 1.0 > closed.accuracy_ll
    assert icl.accuracy_gen >= 2 / 3, [r["generation"] for r in icl.records]
    assert icl.gold_nll < closed.gold_nll - 1.0
