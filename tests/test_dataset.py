"""On-disk self-study datasets: format, resumable writer, corruption errors, grain pipeline."""

import json
import logging
import os

import numpy as np
import pytest

from cas_jax.training import dataset

K = 4


def _conversation(doc_id, index, length, rng):
    mask = np.zeros(length, bool)
    mask[length // 2:length - 1] = True
    m = int(mask.sum())
    return dataset.Conversation(
        tokens=rng.integers(1, 1000, length).astype(np.int32), loss_mask=mask,
        teacher_ids=rng.integers(0, 1000, (m, K)).astype(np.int32),
        teacher_logprobs=-rng.random((m, K)).astype(np.float32), doc_id=doc_id,
        conversation_index=index, chunk_start=3, chunk_end=40, seed_family="question",
        messages=json.dumps([{"role": "user", "content": f"q{index}"}]))


def _write(data_dir, docs=("b", "a", "c"), per_doc=7, shard_count=2, batch_size=3, seed=0):
    """Writes a dataset the way run_shard does; returns the conversations keyed by id."""
    rng = np.random.default_rng(seed)
    items = [(d, i) for d in docs for i in range(per_doc)]
    convs = {it: _conversation(*it, int(rng.integers(6, 30)), rng) for it in items}
    for s in range(shard_count):
        mine = items[s::shard_count]
        batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
        w = dataset.ShardWriter(str(data_dir), s, shard_count, run={"seed": seed},
                                doc_ids=docs, num_items=len(mine), num_batches=len(batches))
        for j, batch in enumerate(batches):
            w.write_batch(j, [convs[it] for it in batch])
        assert w.complete
    return convs


def _ids(batch):
    return list(zip(batch["doc_index"].tolist(), batch["conversation_index"].tolist()))


def test_record_round_trip():
    conv = _conversation("fr", 3, 12, np.random.default_rng(0))
    back = dataset.Conversation.from_bytes(conv.to_bytes())
    for f in ("tokens", "loss_mask", "teacher_ids", "teacher_logprobs"):
        np.testing.assert_array_equal(getattr(back, f), getattr(conv, f))
        assert getattr(back, f).dtype == getattr(conv, f).dtype
    assert (back.doc_id, back.conversation_index, back.chunk_start, back.chunk_end,
            back.seed_family, back.messages) == ("fr", 3, 3, 40, "question", conv.messages)


def test_pipeline_yields_every_conversation_once_per_epoch(tmp_path):
    convs = _write(tmp_path)
    assert dataset.doc_ids(str(tmp_path)) == ("a", "b", "c")
    it = dataset.make_train_iterator(str(tmp_path), batch_size=5, seq_len=32, seed=1,
                                     num_epochs=2, shard_index=0, shard_count=1)
    batches = list(it)
    seen = [x for b in batches for x in _ids(b)]
    assert len(seen) == 2 * len(convs)
    epochs = [seen[:len(convs)], seen[len(convs):]]
    want = sorted(("abc".index(d), i) for d, i in convs)
    assert sorted(epochs[0]) == want and sorted(epochs[1]) == want
    assert epochs[0] != epochs[1]  # reshuffled per epoch

    b = batches[0]
    assert b["tokens"].shape == (5, 32) and b["tokens"].dtype == np.int32
    assert b["loss_mask"].dtype == bool and b["teacher_ids"].shape == (5, 32, K)
    assert b["teacher_ids"].dtype == np.int32 and b["teacher_logprobs"].dtype == np.float32
    assert b["doc_index"].dtype == b["length"].dtype == np.int32
    for row, (d, i) in enumerate(_ids(b)):
        conv, n = convs[("abc"[d], i)], int(b["length"][row])
        assert n == len(conv.tokens)
        np.testing.assert_array_equal(b["tokens"][row, :n], conv.tokens)
        assert not b["tokens"][row, n:].any() and not b["loss_mask"][row, n:].any()
        np.testing.assert_array_equal(b["loss_mask"][row, :n], conv.loss_mask)
        np.testing.assert_array_equal(b["teacher_ids"][row][conv.loss_mask.nonzero()[0]],
                                      conv.teacher_ids)
        np.testing.assert_array_equal(b["teacher_logprobs"][row][b["loss_mask"][row]],
                                      conv.teacher_logprobs)
        assert not b["teacher_logprobs"][row][~b["loss_mask"][row]].any()


def test_truncation_keeps_aligned_teacher_rows_and_is_reported(tmp_path, caplog):
    convs = _write(tmp_path)
    long = sum(len(c.tokens) > 12 for c in convs.values())
    with caplog.at_level(logging.WARNING):
        it = dataset.make_train_iterator(str(tmp_path), batch_size=4, seq_len=12, seed=0,
                                         shuffle=False, shard_index=0, shard_count=1)
    assert f"{long} of {len(convs)} conversations are longer than seq_len=12" in caplog.text
    for b in it:
        for row, (d, i) in enumerate(_ids(b)):
            conv = convs[("abc"[d], i)]
            assert b["length"][row] == min(12, len(conv.tokens))
            mask = conv.loss_mask[:12].copy()
            if len(conv.tokens) > 12:
                mask[11] = False  # predicts token 12, cut off
            assert not b["loss_mask"][row, b["length"][row] - 1]
            np.testing.assert_array_equal(b["loss_mask"][row, :len(mask)], mask)
            np.testing.assert_array_equal(b["teacher_ids"][row][mask.nonzero()[0]],
                                          conv.teacher_ids[:mask.sum()])


def test_processes_read_their_block_of_every_global_batch(tmp_path):
    convs = _write(tmp_path)
    kw = dict(batch_size=6, seq_len=32, seed=0, num_epochs=2)
    single = [_ids(b) for b in dataset.make_train_iterator(
        str(tmp_path), shard_index=0, shard_count=1, drop_remainder=True, **kw)]
    per_host = [[_ids(b) for b in dataset.make_train_iterator(
        str(tmp_path), shard_index=h, shard_count=3, **kw)] for h in range(3)]
    assert all(len(h) == len(single) == 2 * len(convs) // 6 for h in per_host)
    for step, want in enumerate(single):  # stacked in process order = the global batch
        assert [x for h in per_host for x in h[step]] == list(want)
    assert all(len(b) == 2 for h in per_host for b in h)
    with pytest.raises(ValueError, match="multiple of 4 processes"):
        dataset.make_train_iterator(str(tmp_path), shard_index=0, shard_count=4, **kw)


def test_iterator_state_restores_exactly(tmp_path):
    _write(tmp_path)
    kw = dict(batch_size=3, seq_len=32, seed=7, num_epochs=None, shard_index=0, shard_count=1)
    it = dataset.make_train_iterator(str(tmp_path), **kw)
    for _ in range(4):
        next(it)
    state = it.get_state()
    json.dumps(state)  # serialisable for checkpoints
    expected = [next(it) for _ in range(10)]  # crosses an epoch boundary (21 records)
    restored = dataset.make_train_iterator(str(tmp_path), **kw)
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_corrupted_batch_file_names_the_file(tmp_path):
    _write(tmp_path)
    path = tmp_path / "shard-00001-of-00002" / "batch-000001.array_record"
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF  # inside the first chunk's data
    path.write_bytes(bytes(data))
    it = dataset.make_train_iterator(str(tmp_path), batch_size=4, seq_len=32, seed=0,
                                     shard_index=0, shard_count=1)
    with pytest.raises(dataset.CorruptDatasetError, match="shard-00001-of-00002/batch-000001"):
        list(it)


def test_truncated_or_missing_files_are_reported_up_front(tmp_path):
    _write(tmp_path)
    path = tmp_path / "shard-00000-of-00002" / "batch-000002.array_record"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(dataset.CorruptDatasetError, match="batch-000002.array_record.*truncated"):
        dataset.ConversationSource(str(tmp_path))
    os.remove(path)
    with pytest.raises(dataset.CorruptDatasetError, match="batch-000002.array_record.*missing"):
        dataset.ConversationSource(str(tmp_path))
    (tmp_path / "shard-00001-of-00002.json").write_text('{"format_version": 1, "shard')
    with pytest.raises(dataset.CorruptDatasetError, match="shard-00001-of-00002.json"):
        dataset.ConversationSource(str(tmp_path))


def test_writer_resumes_and_rejects_changed_settings(tmp_path):
    rng = np.random.default_rng(0)
    convs = [_conversation("a", i, 10, rng) for i in range(4)]
    kw = dict(run={"seed": 0}, doc_ids=["a"], num_items=4, num_batches=2)
    w = dataset.ShardWriter(str(tmp_path), 0, 1, **kw)
    w.write_batch(0, convs[:2])
    with pytest.raises(ValueError, match="out of order"):
        w.write_batch(0, convs[:2])
    w = dataset.ShardWriter(str(tmp_path), 0, 1, **kw)
    assert (w.batches_done, w.conversations_done, w.complete) == (1, 2, False)
    w.write_batch(1, convs[2:])
    assert w.complete and len(dataset.ConversationSource(str(tmp_path))) == 4
    with pytest.raises(ValueError, match=r"run\.seed"):
        dataset.ShardWriter(str(tmp_path), 0, 1, **{**kw, "run": {"seed": 1}})


def test_unfinished_dataset_reads_finalised_batches_with_a_warning(tmp_path, caplog):
    rng = np.random.default_rng(0)
    w = dataset.ShardWriter(str(tmp_path), 0, 2, run={}, doc_ids=["a"], num_items=4,
                            num_batches=2)
    w.write_batch(0, [_conversation("a", i, 10, rng) for i in range(2)])
    with caplog.at_level(logging.WARNING):
        source = dataset.ConversationSource(str(tmp_path))
    assert len(source) == 2
    assert "missing [1], unfinished [0]" in caplog.text
