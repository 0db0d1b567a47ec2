"""studies.fields: accuracy by question field, and the gap between two methods per field."""

import pytest

from cas_jax.evaluation.questions import Question
from cas_jax.studies import fields


def _q(doc, text, field):
    return Question(doc_id=doc, question=text, gold="a", field=field, options=("a", "b"),
                    answer=0)


def _obj(correct):
    return {"records": [{"kind": "mc", "doc_id": d, "question": t, "correct_ll": c}
                        for (d, t), c in correct.items()]
            + [{"kind": "free", "doc_id": "x", "question": "ignored", "correct_ll": True}]}


def test_field_table_groups_each_methods_records_by_field_and_sorts_by_the_gap():
    qs = [_q("a", "forest?", "forest"), _q("b", "forest?", "forest"), _q("a", "area?", "area")]
    icl = _obj({("a", "forest?"): True, ("b", "forest?"): True, ("a", "area?"): True})
    oracle = _obj({("a", "forest?"): False, ("b", "forest?"): True, ("a", "area?"): True})
    table = fields.field_table(qs, {"icl": icl, "oracle": oracle})
    assert sorted(table) == ["area", "forest"]
    assert table["forest"]["oracle"].tolist() == [0.0, 1.0]
    text = fields.format_fields(table, ["oracle", "icl"], gap=("icl", "oracle"))
    lines = text.splitlines()
    assert lines[0] == "| field | questions | oracle | icl | icl minus oracle |"
    assert lines[2] == "| forest | 2 | 0.50 | 1.00 | +0.50 |"  # the largest gap first
    assert lines[3] == "| area | 1 | 1.00 | 1.00 | +0.00 |"


def test_a_record_of_another_study_is_refused():
    qs = [_q("a", "forest?", "forest")]
    with pytest.raises(ValueError, match="not one of the study's questions"):
        fields.field_table(qs, {"icl": _obj({("z", "forest?"): True})})
