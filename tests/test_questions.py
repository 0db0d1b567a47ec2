from __future__ import annotations

import dataclasses
import json

import pytest

from cas_jax.documents import corpus
from cas_jax.documents.corpus import load_factbook
from cas_jax.evaluation.questions import (FIELD_NAMES, FIELDS, FactField, Question, clean_answer,
                                          field_values, generate_factbook_questions, read_questions,
                                          to_section_questions, write_questions)
from cas_jax.studies import splits

IDS = ["fr", "gm", "ja", "br", "sf", "xx", "oo", "cc"]


@pytest.mark.parametrize("raw, clean", [
    ("Tripoli (Tarabulus)", "Tripoli"),
    ("157 (2013)", "157"),
    ("0.43% (2015 est.)", "0.43%"),
    ("Republic Day, 11 December (1958); note - commemorates the day", "Republic Day, 11 December"),
    ("Jerusalem: note - proclaimed in 1950", "Jerusalem"),
    ('"Kassaman" (We Pledge)', "Kassaman"),
    ("Mt. X (a (nested) aside) 2,829 m", "Mt. X 2,829 m"),
    ("NA", None),
    ("none (territory of Australia)", None),
    ("x" * 200, None),
])
def test_clean_answer(raw, clean):
    assert clean_answer(raw) == clean


def test_field_values_are_short_and_clean():
    assert len(FIELD_NAMES) >= 8
    for field in FIELD_NAMES:
        values = field_values(field)
        assert len(values) > 150, field
        assert all(v and len(v) <= 60 and "(" not in v and "note -" not in v for v in values.values()), field
    fr = {field: field_values(field).get("fr") for field in FIELD_NAMES}
    assert fr["capital"] == "Paris"
    assert fr["total_area"] == "643,801 sq km"
    assert fr["highest_point"] == "Mont Blanc 4,807 m"
    assert fr["national_holiday"] == "Fete de la Federation, 14 July"
    assert fr["airports"] == "464"
    assert fr["population_growth_rate"] == "0.43%"
    assert fr["internet_code"] == ".fr"
    gm = {field: field_values(field).get("gm") for field in FIELD_NAMES}
    assert gm["geographic_coordinates"] == "51 00 N, 9 00 E"
    assert gm["land_area"] == "348,672 sq km"
    assert gm["land_boundaries"] == "3,714 km"
    assert gm["agricultural_land"] == "48%"  # "48% ++ arable land 34.1%; ..." cut by its pattern
    assert gm["renewable_water"] == "154 cu km"
    assert field_values("renewable_water")["ri"] == "162.2 cu km"  # "(note - ...) (2011)" dropped
    with pytest.raises(ValueError, match="unknown field"):
        field_values("flag")


def test_split_is_fixed_and_disjoint():
    dev, test = splits.dev_profiles(), splits.test_profiles()
    assert len(dev) == splits.NUM_DEV and not set(dev) & set(test)
    # The profiles every recorded study used: adding question fields must not move them.
    assert test[:8] == ["ws", "ti", "mj", "ly", "mo", "wa", "ja", "ne"]
    assert set(splits.SPLIT_FIELDS) <= set(FIELD_NAMES) and len(FIELD_NAMES) > len(splits.SPLIT_FIELDS)


def test_multiple_choice_distractors_come_from_other_countries():
    qs = generate_factbook_questions(IDS, num_per_doc=6, seed=0)
    for doc_id in IDS:  # 6 each, or all the fields a sparse profile (an ocean) has
        available = sum(doc_id in field_values(f) for f in FIELD_NAMES)
        assert sum(q.doc_id == doc_id for q in qs) == min(6, available)
    assert sum(q.doc_id == "oo" for q in qs) < 6
    titles = {i: load_factbook(documents=[i])[i].title for i in IDS}
    for q in qs:
        assert q.kind == "mc" and len(q.options) == 4
        assert q.options[q.answer] == q.gold
        values = field_values(q.field)
        assert q.gold == values[q.doc_id]
        assert titles[q.doc_id] in q.question
        assert len({o.casefold() for o in q.options}) == 4
        others = {v for doc_id, v in values.items() if doc_id != q.doc_id}
        for distractor in q.options[:q.answer] + q.options[q.answer + 1:]:
            assert distractor in others and distractor.casefold() != q.gold.casefold()
    assert len({q.answer for q in qs}) == 4  # the gold is not always in one position
    assert len({q.field for q in qs if q.doc_id == "fr"}) == 6  # distinct fields per document


def test_generation_is_seeded_and_covers_many_fields():
    a = generate_factbook_questions(IDS, num_per_doc=3, seed=1)
    assert a == generate_factbook_questions(load_factbook(documents=IDS), num_per_doc=3, seed=1)
    assert a != generate_factbook_questions(IDS, num_per_doc=3, seed=2)
    every = generate_factbook_questions(IDS, num_per_doc=100, seed=0)
    assert len({q.field for q in every}) >= 8
    fr_fields = [f for f in FIELD_NAMES if "fr" in field_values(f)]
    assert 8 <= len(fr_fields) < len(FIELD_NAMES)  # France has no usable independence date
    assert sorted(q.field for q in every if q.doc_id == "fr") == sorted(fr_fields)


def test_free_answer_questions_have_gold_and_no_options():
    qs = generate_factbook_questions(["fr"], num_per_doc=2, seed=0, kinds=("mc", "free"))
    mc, free = qs[0::2], qs[1::2]
    assert [q.kind for q in mc] == ["mc", "mc"] and [q.kind for q in free] == ["free", "free"]
    for m, f in zip(mc, free):
        assert f.options is None and f.answer is None
        assert (f.question, f.gold, f.field) == (m.question, m.gold, m.field)
        assert "options" not in f.to_json() and f.to_json()["gold"] == m.gold


def test_generation_rejects_bad_arguments():
    with pytest.raises(ValueError, match="'zz'"):
        generate_factbook_questions(["fr", "zz"], 1, 0)
    with pytest.raises(ValueError, match="kinds"):
        generate_factbook_questions(["fr"], 1, 0, kinds=("essay",))
    with pytest.raises(ValueError, match="num_per_doc"):
        generate_factbook_questions(["fr"], 0, 0)


def test_write_read_roundtrip(tmp_path):
    qs = generate_factbook_questions(IDS, num_per_doc=2, seed=3, kinds=("mc", "free"))
    path = tmp_path / "sub" / "questions.jsonl"
    write_questions(path, qs)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(qs)
    first = json.loads(lines[0])
    assert set(first) == {"doc_id", "question", "options", "answer", "field", "gold"}
    assert read_questions(path) == qs


def test_read_accepts_foreign_files_with_extra_keys(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(
        '{"doc_id": "p1", "question": "Q?", "options": ["a", "b", "c"], "answer": 1, "source": "x"}\n'
        "\n"
        '{"doc_id": "p2", "question": "Who?", "gold": "Ann"}\n', encoding="utf-8")
    qs = read_questions(path)
    assert qs == [Question("p1", "Q?", "b", None, ("a", "b", "c"), 1), Question("p2", "Who?", "Ann")]


@pytest.mark.parametrize("bad_line, expected", [
    ("{not json", "expected a JSON object"),
    ("[1, 2]", "expected a JSON object"),
    ('{"question": "Q?", "gold": "a"}', "'doc_id'"),
    ('{"doc_id": "d", "question": "", "gold": "a"}', "'question'"),
    ('{"doc_id": "d", "question": "Q?"}', "'options' and 'answer'"),
    ('{"doc_id": "d", "question": "Q?", "options": "abc", "answer": 0}', "'options'"),
    ('{"doc_id": "d", "question": "Q?", "options": ["a", "b"], "answer": 2}', r"'answer'.*\[0, 2\)"),
    ('{"doc_id": "d", "question": "Q?", "options": ["a", "b"], "answer": true}', "'answer'"),
    ('{"doc_id": "d", "question": "Q?", "options": ["a", "b"]}', "'answer'"),
    ('{"doc_id": "d", "question": "Q?", "options": ["a", "b"], "answer": 0, "gold": "b"}', "'gold'"),
    ('{"doc_id": "d", "question": "Q?", "gold": 3}', "'gold'"),
])
def test_read_rejects_malformed_line_naming_file_and_line(tmp_path, bad_line, expected):
    path = tmp_path / "q.jsonl"
    good = '{"doc_id": "d", "question": "Q?", "gold": "a"}'
    path.write_text(f"{good}\n\n{bad_line}\n{good}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"q\.jsonl:3: .*{expected}"):
        read_questions(path)


def test_each_field_lies_in_one_section():
    section = {f.name: corpus.section_doc_id("fr", f.section) for f in FIELDS}
    assert section["capital"] == section["national_holiday"] == "fr-government"
    assert section["coastline"] == section["highest_point"] == "fr-geography"
    assert section["internet_code"] == "fr-communications"
    assert section["airports"] == "fr-transportation"
    assert section["population"] == "fr-people_and_society"
    with pytest.raises(ValueError, match="'mixed'.*one section"):
        FactField("mixed", (("Geography", "Area"), ("Economy", "Area")), "{name}?")


def test_section_questions_ask_only_their_section():
    sections = corpus.load_factbook_sections(profiles=["fr", "oo"]).ids
    qs = generate_factbook_questions(sections, num_per_doc=100, seed=0, kinds=("mc", "free"))
    index, titles = corpus.factbook_section_index(), corpus.factbook_titles()
    by_field = {f.name: f for f in FIELDS}
    for q in qs:
        profile_id, section = index[q.doc_id]
        assert by_field[q.field].section == section
        assert q.gold == field_values(q.field)[profile_id]
        assert q.question == by_field[q.field].template.format(name=titles[profile_id])
    assert {q.doc_id for q in qs} < set(sections)  # fr-economy holds no field
    profile_level = generate_factbook_questions(["fr", "oo"], num_per_doc=100, seed=0)
    assert sorted((index[q.doc_id][0], q.field) for q in qs if q.kind == "mc") == \
        sorted((q.doc_id, q.field) for q in profile_level)
    fr_gov = generate_factbook_questions(["fr-government"], num_per_doc=2, seed=0)
    assert len(fr_gov) == 2 and all(q.doc_id == "fr-government" for q in fr_gov)
    capital = generate_factbook_questions(["fr-government"], num_per_doc=100, seed=0)
    capital = next(q for q in capital if q.field == "capital")
    assert capital.question == "What is the capital of France?" and capital.gold == "Paris"
    others = set(field_values("capital").values()) - {"Paris"}  # distractors from all profiles
    assert all(o in others for o in capital.options if o != "Paris")
    with pytest.raises(ValueError, match="'fr-geo'"):
        generate_factbook_questions(["fr-geography", "fr-geo"], 1, 0)


def test_to_section_questions_round_trip(tmp_path):
    qs = generate_factbook_questions(IDS, num_per_doc=4, seed=5, kinds=("mc", "free"))
    mapped = to_section_questions(qs)
    index = corpus.factbook_section_index()
    by_field = {f.name: f for f in FIELDS}
    sections = corpus.load_factbook_sections(documents=dict.fromkeys(q.doc_id for q in mapped))
    for q, m in zip(qs, mapped, strict=True):
        assert m.doc_id == corpus.section_doc_id(q.doc_id, by_field[q.field].section)
        assert index[m.doc_id][0] == q.doc_id
        assert dataclasses.replace(m, doc_id=q.doc_id) == q
        heads = tuple(" > ".join(path) + ":" for path in by_field[q.field].paths)
        assert any(line.startswith(heads) for line in sections[m.doc_id].text.splitlines())
    write_questions(tmp_path / "s.jsonl", mapped)
    assert read_questions(tmp_path / "s.jsonl") == mapped


@pytest.mark.parametrize("question, expected", [
    (Question("fr", "Who?", "Ann"), r"'Who\?'.*'fr'.*field None"),
    (Question("fr", "Flag?", "blue", "flag"), r"'Flag\?'.*field 'flag'"),
    (Question("fr-government", "Capital?", "Paris", "capital"), r"'Capital\?'.*'fr-government'.*not a"),
    (Question("oo", "Ocean capital?", "x", "capital"), r"'Ocean capital\?'.*no section 'oo-government'"),
])
def test_to_section_questions_rejects_questions_it_cannot_place(question, expected):
    with pytest.raises(ValueError, match=expected):
        to_section_questions([Question("fr", "Q?", "Paris", "capital"), question])
