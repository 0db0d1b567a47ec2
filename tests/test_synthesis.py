"""Self-study synthesis with a tiny random model and the real SmolLM2 tokenizer (the `tiny`
fixture of conftest.py)."""

import json

import jax
import numpy as np
import pytest

from cas_jax.documents.corpus import Document
from cas_jax.model import llama as model_lib, rendering
from cas_jax.training import dataset, synthesis

# Small enough that every prompt fits one length bucket and every batch pads to 4 rows, so the
# sampler compiles once for the whole module.
CONFIG = synthesis.SynthesisConfig(chunk_min=16, chunk_max=32, max_user_tokens=6,
                                   max_answer_tokens=10, topk=5)


@pytest.fixture(scope="module")
def documents():
    docs = [Document(f"doc{i}", f"Report {i}",
                     " ".join(f"Item {j} of report {i} has value {7 * i + j}." for j in range(n)))
            for i, n in enumerate((40, 25, 1))]  # doc2 is shorter than chunk_min
    return {d.doc_id: d for d in docs}


def test_work_items_are_deterministic_and_distinct():
    a = synthesis.work_items(["x", "y"], 3, seed=5)
    assert a == synthesis.work_items(["x", "y"], 3, seed=5)
    assert [(it.doc_id, it.conversation_index) for it in a] == [
        ("x", 0), ("x", 1), ("x", 2), ("y", 0), ("y", 1), ("y", 2)]
    assert len({it.seed for it in a}) == 6
    other = synthesis.work_items(["x", "y"], 3, seed=6)
    assert {it.seed for it in a}.isdisjoint(it.seed for it in other)


def test_family_weights_are_validated_and_used():
    probs = synthesis.SynthesisConfig(family_weights=(0, 0, 1, 0, 0, 0, 0)).family_probs()
    assert synthesis.FAMILIES[int(np.argmax(probs))] == "question" and probs.max() == 1
    with pytest.raises(ValueError, match="family_weights"):
        synthesis.SynthesisConfig(family_weights=(1, 2)).family_probs()
    assert all(len(p) >= 3 for p in synthesis.SEED_PROMPTS.values())
    assert set(synthesis.FAMILIES) == {"structuring", "summarization", "question", "use_case",
                                       "creative", "generic", "spans"}


def _teacher_context(tiny, documents, conv):
    tok = tiny.tokenizer
    doc = documents[conv.doc_id]
    ids = tok(doc.text, add_special_tokens=False)["input_ids"]
    chunk = tok.decode(ids[conv.chunk_start:conv.chunk_end])
    r = rendering.rendering_for(tok)
    return (r.document(rendering.titled(doc.title, chunk))
            + r.conversation(json.loads(conv.messages), add_generation_prompt=False), len(ids))


def test_batch_alignment_spans_and_teacher_logprobs(tiny, documents):
    study = synthesis.SelfStudy(tiny, documents, CONFIG)
    items = synthesis.work_items(sorted(documents), 1, seed=0)
    convs, generated = study.run_batch(items)
    assert generated > 0 and len(convs) == len(items)
    # The batch ran with the document blocks prefilled once: the teacher rows checked below
    # came from that path.
    plans = [study.plan(it) for it in items]
    context = study.system_context(plans)
    assert context is not None
    assert context.lengths.tolist() == [len(study.system_tokens(p)) for p in plans]
    prompt = study.user_prompt(plans[0])
    assert list(context.strip(0, prompt)) == prompt[len(context.ids[0]):]
    with pytest.raises(ValueError, match="row 0.*document block"):
        context.strip(0, prompt[1:])
    for item, conv in zip(items, convs):
        assert (conv.doc_id, conv.conversation_index) == (item.doc_id, item.conversation_index)
        teacher, doc_len = _teacher_context(tiny, documents, conv)
        assert 0 <= conv.chunk_start < conv.chunk_end <= doc_len
        assert (CONFIG.chunk_min <= conv.chunk_end - conv.chunk_start <= CONFIG.chunk_max
                or (conv.chunk_start, conv.chunk_end) == (0, doc_len))
        assert conv.seed_family in synthesis.FAMILIES

        # loss_mask[t] marks predictions of the assistant turn: its content + end of turn.
        messages = json.loads(conv.messages)
        targets = np.flatnonzero(conv.loss_mask) + 1
        assert tiny.tokenizer.decode(conv.tokens[targets]) == messages[1]["content"] + "<|im_end|>"
        assert np.all(np.diff(targets) == 1)
        assert conv.teacher_ids.shape == conv.teacher_logprobs.shape == (len(targets), 5)

        # Stored teacher rows equal an unpadded direct forward of chunk + conversation.
        offset = len(teacher) - len(conv.tokens)
        assert teacher[offset + targets[0] - 1:] == conv.tokens[targets[0] - 1:].tolist()
        logits, _ = model_lib.forward(tiny.params, np.asarray([teacher], np.int32),
                                      np.arange(len(teacher), dtype=np.int32)[None],
                                      config=tiny.config)
        logp = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))[targets - 1 + offset]
        np.testing.assert_allclose(np.take_along_axis(logp, conv.teacher_ids, axis=1),
                                   conv.teacher_logprobs, atol=1e-5)
        kth = np.sort(logp, axis=1)[:, -5]
        assert np.all(conv.teacher_logprobs[:, -1] >= kth - 1e-5)
        assert np.all(np.diff(conv.teacher_logprobs, axis=1) <= 0)


def test_two_rounds_mask_both_answers(tiny, documents):
    study = synthesis.SelfStudy(tiny, documents, synthesis.SynthesisConfig(
        chunk_min=16, chunk_max=32, max_user_tokens=4, max_answer_tokens=5, topk=3, rounds=2))
    convs, _ = study.run_batch(synthesis.work_items(sorted(documents), 1, seed=1))
    for conv in convs:
        messages = json.loads(conv.messages)
        assert [m["role"] for m in messages] == ["user", "assistant"] * 2
        runs = np.flatnonzero(np.diff(np.concatenate([[0], conv.loss_mask.astype(int), [0]])))
        spans = runs.reshape(-1, 2)
        assert len(spans) == 2
        for (s, e), m in zip(spans, messages[1::2]):
            assert tiny.tokenizer.decode(conv.tokens[s + 1:e + 1]) == m["content"] + "<|im_end|>"


def _records(data_dir):
    source = dataset.ConversationSource(data_dir)
    return [source[i] for i in range(len(source))]


def _same(a, b):
    return all(np.array_equal(getattr(a, f), getattr(b, f)) if isinstance(getattr(a, f), np.ndarray)
               else getattr(a, f) == getattr(b, f) for f in (
                   "tokens", "loss_mask", "teacher_ids", "teacher_logprobs", "doc_id",
                   "conversation_index", "chunk_start", "chunk_end", "seed_family", "messages"))


def test_killed_synthesis_resumes_to_the_uninterrupted_result(tiny, documents, tmp_path):
    study = synthesis.SelfStudy(tiny, documents, CONFIG)
    items = synthesis.work_items(sorted(documents), 3, seed=3)
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    synthesis.run_shard(study, items, whole, batch_size=3)

    class Killed(Exception):
        pass

    def kill(progress):
        assert (progress.conversations_done, progress.conversations_total) == (3, 9)
        raise Killed

    with pytest.raises(Killed):
        synthesis.run_shard(study, items, resumed, batch_size=3, on_batch=kill)
    assert len(_records(resumed)) == 3
    (tmp_path / "resumed" / "shard-00000-of-00001" / "batch-000001.array_record.tmp").write_bytes(
        b"partial write of a killed run")
    seen = []
    writer = synthesis.run_shard(study, items, resumed, batch_size=3, on_batch=seen.append)
    assert writer.complete and [p.conversations_done for p in seen] == [6, 9]
    assert all(p.conversations_resumed == 3 and p.eta_s >= 0 for p in seen)
    assert not list((tmp_path / "resumed").rglob("*.tmp"))
    a, b = _records(whole), _records(resumed)
    assert len(a) == len(b) == 9 and all(_same(x, y) for x, y in zip(a, b))
    assert [(r.doc_id, r.conversation_index) for r in b] == [
        (it.doc_id, it.conversation_index) for it in items]
    with pytest.raises(ValueError, match="batch_size"):
        synthesis.run_shard(study, items, resumed, batch_size=2)


def test_shards_partition_the_work(tiny, documents, tmp_path):
    study = synthesis.SelfStudy(tiny, documents, CONFIG)
    items = synthesis.work_items(sorted(documents), 2, seed=0)
    for i in range(2):
        synthesis.run_shard(study, items, str(tmp_path), batch_size=3, shard_index=i,
                            shard_count=2)
    keys = sorted((r.doc_id, r.conversation_index) for r in _records(str(tmp_path)))
    assert keys == sorted((it.doc_id, it.conversation_index) for it in items)
    assert dataset.doc_ids(str(tmp_path)) == ("doc0", "doc1", "doc2")


def test_progress_rate_is_generated_tokens_or_for_spans_conversations():
    talk = synthesis.Progress(conversations_done=6, conversations_total=10,
                              conversations_resumed=2, generated_tokens=300, elapsed_s=2.0)
    assert talk.rate() == "150.0 generated tok/s" and talk.eta_s == 2.0  # 4 left at 2/s
    spans = synthesis.Progress(6, 10, 2, 0, 2.0)  # span conversations generate nothing
    assert spans.tokens_per_s == 0 and spans.rate() == "2.00 conversations/s"
