"""The one rendering of "document, then conversation", and that every path uses it."""

import numpy as np
import pytest

from cas_jax.documents.corpus import Collection, Document
from cas_jax.evaluation import prompts
from cas_jax.evaluation.questions import Question
from cas_jax.model import loading, rendering, tokenizer as tok_lib
from cas_jax.training import spans, synthesis, train_collection

CONV = [{"role": "user", "content": "What is the capital?"},
        {"role": "assistant", "content": "Quillton."},
        {"role": "user", "content": "And its river?"},
        {"role": "assistant", "content": "The Olun."}]


@pytest.fixture(scope="module")
def tok():
    return tok_lib.load_tokenizer(loading.default_model_path())


def test_conversation_has_no_system_turn_and_follows_the_document(tok):
    r = rendering.Rendering(tok, "plain")
    text = tok.decode(r.prompt("Zorbania\nCapital: Quillton", CONV[:1]))
    assert text == ("Zorbania\nCapital: Quillton\n<|im_start|>user\nWhat is the capital?"
                    "<|im_end|>\n<|im_start|>assistant\n")
    # SmolLM2's own template would insert its default system turn; the rendering never does.
    assert "SmolLM" in tok.decode(tok_lib.encode_chat(tok, CONV[:1]))
    assert "system" not in tok.decode(r.conversation(CONV))
    sys_r = rendering.Rendering(tok, "system")
    assert sys_r.prompt("DOC", CONV, add_generation_prompt=False) == tok_lib.encode_chat(
        tok, [{"role": "system", "content": "DOC"}] + CONV, add_generation_prompt=False)
    with pytest.raises(ValueError, match="system turns"):
        r.conversation([{"role": "system", "content": "x"}] + CONV)
    with pytest.raises(ValueError, match="format"):
        rendering.Rendering(tok, "markdown")
    with pytest.raises(ValueError, match="non-empty"):
        r.document("  ")


def test_assistant_spans_cover_each_answer_and_its_end_of_turn(tok):
    r = rendering.rendering_for(tok)
    ids = r.conversation(CONV, add_generation_prompt=False)
    got = [tok.decode(ids[s:e]) for s, e in r.assistant_spans(CONV)]
    assert got == ["Quillton.<|im_end|>\n", "The Olun.<|im_end|>\n"]


def test_every_path_renders_the_same_way(tok):
    """Evaluation (ICL and closed book), the self-study teacher and student, and cartridge
    initialisation all lay out document(...) + conversation(...) of `rendering`."""
    r = rendering.rendering_for(tok)
    doc = Document("zo", "Zorbania", "Zorbania\nGovernment > Capital: Quillton\n"
                   "Geography > River: the Olun runs through the whole country")
    q = Question("zo", "What is the capital of Zorbania?", "Quillton")
    user = [{"role": "user", "content": q.question}]
    # evaluation
    icl = prompts.build_prompt(tok, q, [(doc.title, doc.text)])
    assert icl.context == r.document(doc.text) and icl.query == r.conversation(user)
    assert prompts.build_prompt(tok, q).query == r.conversation(user)
    block, _ = prompts.fit_context(tok, [(doc.title, doc.text)], 10_000)
    assert block == icl.context
    # cartridge initialisation: the block's own first P tokens
    first = train_collection.document_tokens(tok, doc.text, 8)
    assert first.tolist() == r.document(doc.text)[:8]

    # self-study: the teacher reads document(chunk) + conversation, the student the conversation
    class Model:  # only the tokenizer is used by planning and views
        tokenizer = tok

    study = synthesis.SelfStudy.__new__(synthesis.SelfStudy)
    study.model, study.documents = Model(), Collection([doc])
    study.config = synthesis.SynthesisConfig(family_weights=(0,) * 6 + (1,), span_turns=2)
    study.probs = study.config.family_probs()
    study.stop_ids = tuple(tok_lib.stop_token_ids(tok))
    study.render, study._doc_tokens = r, {}
    plan = study.plan(synthesis.work_items(["zo"], 1, seed=0)[0])
    assert plan.family == synthesis.SPANS and len(plan.conversation) == 4
    teacher, targets, student, mask = study.views(plan)
    assert student.tolist() == r.conversation(plan.conversation, add_generation_prompt=False)
    assert teacher.tolist() == r.document(plan.passage) + student.tolist()
    assert np.array_equal(teacher[targets], student[np.flatnonzero(mask)])
    assert study.answer_prompt(plan) == r.prompt(plan.passage, plan.conversation)


def test_span_conversations_quote_the_chunk():
    text = ("Zorbania\nGovernment > Capital > name: Quillton\nshort line\n"
            "The Olun rises in the northern hills. It floods each spring! " * 1)
    segs = spans.segments(text, title="Zorbania")
    assert segs == ["Government > Capital > name: Quillton",
                    "The Olun rises in the northern hills. It floods each spring!"]
    assert spans.cue(segs[0]) == 'What does the document say about "Government > Capital > name"?'
    assert spans.cue(segs[1]) == ('How does the document continue after "The Olun rises in the '
                                  'northern"?')
    long = "A sentence of words here. " * 40
    pieces = spans.segments(long.strip(), max_segment_chars=100)
    assert len(pieces) > 5 and all(len(p) <= 100 for p in pieces)
    assert " ".join(pieces) == long.strip()
    conv = spans.conversation(text, np.random.default_rng(0), 5, title="Zorbania")
    assert [m["role"] for m in conv] == ["user", "assistant"] * 2
    assert spans.answers(conv) == segs  # all segments, in document order
    assert spans.conversation("Zorbania\nno", np.random.default_rng(0), 3, title="Zorbania") == []


def test_selfstudy_data_measures(tok):
    from cas_jax.training import selfstudy_data as sq

    assert sq.is_looping("Pitcairn Islands | " * 12)
    assert not sq.is_looping("The capital is Quillton and the river is the Olun.")
    chunk = "the capital of zorbania is quillton and the river is the olun"
    assert sq.grounding("The capital of Zorbania is Quillton.", chunk) == 1.0
    assert sq.grounding("I like to eat green apples every day", chunk) == 0.0
    assert sq.grounding("Quillton", chunk) == 1.0 and sq.grounding("", chunk) == 0.0
    assert sq.keep(["fine answer"]) and not sq.keep(["a b c d e f " * 3])
