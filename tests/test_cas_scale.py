"""The scale benchmark's pure parts (in `cas_jax.studies.cas_study`, used by
`benchmarks.cas_scale`): nested collections, the bytes a cartridge holds resident, baselines
matched by question, the side-by-side table."""

import json
import types

import pytest

from cas_jax.evaluation.questions import Question
from cas_jax.studies import cas_study as cas_scale
from conftest import tiny_config

QDOCS = ["fr-geography", "de-geography"]
ALL = QDOCS + [f"x{i}-economy" for i in range(20)]


def test_collections_are_nested_and_start_with_the_question_documents():
    small = cas_scale.collection_ids(QDOCS, ALL, 5, seed=0)
    big = cas_scale.collection_ids(QDOCS, ALL, 12, seed=0)
    assert small[:2] == QDOCS and big[:5] == small
    assert len(set(big)) == 12 and set(big) <= set(ALL)
    assert cas_scale.collection_ids(QDOCS, ALL, 22, seed=0)[2:] != sorted(ALL[2:])  # shuffled
    assert cas_scale.collection_ids(QDOCS, ALL, 12, seed=1) != big
    for bad in (1, 23):
        with pytest.raises(ValueError, match=f"{bad} documents"):
            cas_scale.collection_ids(QDOCS, ALL, bad, seed=0)


def test_cartridge_bytes_are_kv_plus_adam_moments_of_the_trainable_positions():
    cfg = tiny_config(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=3,
                      head_dim=4)
    model = types.SimpleNamespace(config=cfg)
    kv = 3 * 8 * 2 * 4 * 2 * 4  # layers x P x kv heads x head dim x (K, V) x float32
    got = cas_scale.cartridge_bytes(model, 8, lr=1e-2)
    assert kv + 2 * kv * 7 // 8 <= got <= kv + 2 * kv * 7 // 8 + 16  # + Adam's step counts


def _rec(tmp_path, records):
    (tmp_path / "eval").mkdir()
    with open(tmp_path / "eval" / "icl.json", "w") as f:
        json.dump({"summary": {"method": "icl"}, "records": records}, f)
    return str(tmp_path)


def test_baselines_are_read_in_question_order_and_a_missing_question_is_named(tmp_path):
    recs = [{"doc_id": "a", "question": "q1", "correct_ll": 1},
            {"doc_id": "b", "question": "q2", "correct_ll": 0}]
    rec = _rec(tmp_path, recs)
    qs = [Question(doc_id="b", question="q2", gold="x"), Question(doc_id="a", question="q1",
                                                                  gold="y")]
    assert cas_scale.read_baseline(rec, "icl", qs)["records"] == recs[::-1]
    with pytest.raises(ValueError, match="icl.json: 1 of 2 questions.*'q3'"):
        cas_scale.read_baseline(rec, "icl", qs[:1] + [Question(doc_id="a", question="q3",
                                                               gold="z")])
    with pytest.raises(ValueError, match="closed_book.json is missing"):
        cas_scale.read_baseline(rec, "closed_book", qs)


def test_sizes_table_has_a_column_per_size_and_dashes_for_missing_values():
    def record(n, acc):
        return {"documents": n, "document_tokens": 100 * n, "accuracy": acc,
                "accuracy_ci": {m: (a - 0.1, a + 0.1) for m, a in acc.items()},
                "cas_steps": 6 * n, "budget_share": 0.1, "peak_rss_mb": 1000.0,
                "io_wait_share": None, "paging_read_mb_s": 50.0}
    table = cas_scale.format_sizes([record(40, {"cas_oracle": 0.5, "icl": 0.8}),
                                    record(400, {"cas_oracle": 0.4})])
    lines = table.splitlines()
    assert "40 docs (4000 tok)" in lines[0] and "400 docs (40000 tok)" in lines[0]
    assert "| icl | 0.800 [0.700, 0.900] | - |" in lines
    assert "| cas_oracle | 0.500 [0.400, 0.600] | 0.400 [0.300, 0.500] |" in lines
    assert "| io_wait_share | - | - |" in lines and "| cas_steps | 240 | 2400 |" in lines


def test_sizes_table_labels_methods_with_their_recall_as_records_before_the_field_did():
    new = {"documents": 40, "document_tokens": 400, "accuracy": {"rag_bm25_k1": 0.5},
           "accuracy_ci": {"rag_bm25_k1": (0.4, 0.6)}, "recall": {"rag_bm25_k1": 0.8}}
    old = {"documents": 40, "document_tokens": 400,
           "accuracy": {"rag_bm25_k1 (recall 0.80)": 0.5},
           "accuracy_ci": {"rag_bm25_k1 (recall 0.80)": (0.4, 0.6)}}
    table = cas_scale.format_sizes([new])
    assert "| rag_bm25_k1 (recall 0.80) | 0.500 [0.400, 0.600] |" in table.splitlines()
    assert cas_scale.format_sizes([old]) == table
