"""Question fields by section type (issue 25 item 2): People and Society and Government sections
carry studies of their own, every field's answer lies in the section text the model reads, options
are told apart, and the recorded Geography study's questions stay byte for byte what they were."""

from __future__ import annotations

import collections
import json
import os
import re

import pytest
from absl import flags

from benchmarks import quality
from cas_jax.documents import corpus
from cas_jax.evaluation import questions
from cas_jax.evaluation.questions import (FIELD_GROUPS, FIELDS, field_values,
                                          generate_factbook_questions, write_questions)
from cas_jax.studies import study_runs

RECORDED = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "quality")
SECTION_TYPES = ("people_and_society", "government")
_ASIDE = re.compile(r"\s*(\([^()]*\)|\[[^\[\]]*\])")


def test_recorded_geography_study_questions_are_unchanged(tmp_path):
    """The 319 questions of benchmarks/results/quality, regenerated with its recorded flags."""
    with open(os.path.join(RECORDED, "config.json"), encoding="utf-8") as f:
        rec = json.load(f)["flags"]
    _, qs, docs = study_runs.factbook_questions(rec["split"], rec["profiles"], rec["sections"],
                                                rec["kinds"], rec["seed"])
    assert (len(qs), len(docs)) == (319, 26)
    write_questions(tmp_path / "questions.jsonl", qs)
    with open(os.path.join(RECORDED, "questions.jsonl"), "rb") as f:
        assert (tmp_path / "questions.jsonl").read_bytes() == f.read()


def test_later_field_groups_leave_earlier_questions_unchanged(monkeypatch):
    ids = ["fr", "gm", "ni", "oo", "fr-government", "ni-people_and_society", "gm-geography"]
    every = generate_factbook_questions(ids, len(FIELDS), seed=3, kinds=("mc", "free"))
    first = {f.name for f in FIELD_GROUPS[0]}
    monkeypatch.setattr(questions, "FIELD_GROUPS", FIELD_GROUPS[:1])
    monkeypatch.setattr(questions, "FIELDS", FIELD_GROUPS[0])
    alone = generate_factbook_questions(ids, len(FIELDS), seed=3, kinds=("mc", "free"))
    assert [q for q in every if q.field in first] == alone
    assert len(every) > len(alone)


def test_later_groups_fill_what_earlier_ones_leave():
    qs = generate_factbook_questions(["fr-government", "fr-people_and_society"], 6, seed=0)
    by_name = {f.name: g for g, group in enumerate(FIELD_GROUPS) for f in group}
    gov = [by_name[q.field] for q in qs if q.doc_id == "fr-government"]
    people = [by_name[q.field] for q in qs if q.doc_id == "fr-people_and_society"]
    assert gov == [0, 0, 0, 1, 1, 1]  # France has no usable independence date: 3 of the first 4
    assert people == [0, 0, 0, 0, 0, 1]


def test_section_types_carry_their_own_fields():
    per_section = collections.Counter(corpus.section_slug(f.section) for f in FIELDS)
    assert per_section["geography"] == 13
    assert per_section["people_and_society"] == 15
    assert per_section["government"] == 12
    assert len(set(questions.FIELD_NAMES)) == len(FIELDS)


def _cleaned(text: str) -> str:
    """`text` as answers are cleaned: without (asides), [asides] or quotes, spaces collapsed."""
    while (stripped := _ASIDE.sub("", text)) != text:
        text = stripped
    return re.sub(r"\s+", " ", text.replace('"', ""))


def test_gold_answers_lie_in_their_section_text():
    """For >= 95% of the profiles with a value, per field, the answer is in the section
    document's line of that field (as rendered, or cleaned as answers are)."""
    docs = corpus.load_factbook_sections()
    rates = {}
    for field in FIELDS:
        heads = tuple(" > ".join(path) + ":" for path in field.paths)
        values = field_values(field.name)
        found = 0
        for profile_id, gold in values.items():
            text = docs[corpus.section_doc_id(profile_id, field.section)].text
            lines = [line for line in text.splitlines() if line.startswith(heads)]
            found += any(gold in line or gold in _cleaned(line) for line in lines)
        rates[field.name] = found / len(values)
    assert {name: r for name, r in rates.items() if r < 0.95} == {}


def _canonical(option: str) -> str:
    """Casefolded, spaces collapsed, thousands separators dropped, every number as a float."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", re.sub(r"\s+", " ", option.casefold().strip()))
    return re.sub(r"\d+(\.\d+)?", lambda m: repr(float(m.group(0))), text)


def test_options_are_distinct_after_cleaning_for_every_profile():
    profiles = list(corpus.factbook_profiles())
    qs = generate_factbook_questions(profiles, len(FIELDS), seed=0)
    later = {f.name for group in FIELD_GROUPS[1:] for f in group}
    assert {q.field for q in qs} >= later
    for q in qs:
        assert len({_canonical(o) for o in q.options}) == len(q.options), q
        assert all(len(o) <= questions.MAX_ANSWER_CHARS for o in q.options)


@pytest.mark.parametrize("section", SECTION_TYPES)
def test_study_material_for_a_section_type(section):
    """What `benchmarks.quality --sections=SECTION` studies: a smoke test of its questions."""
    fv = flags.FlagValues()
    flag_set = quality.define_flags(fv)
    fv(["prog", f"--sections={section}", "--split=dev", "--profiles=3"])
    cfg = quality.config(flag_set)
    assert cfg.sections == (section,)
    profiles, qs, docs = study_runs.factbook_questions(cfg.split, cfg.profiles, cfg.sections,
                                                       cfg.kinds, cfg.study.pipeline.seed)
    fields = {f.name for f in FIELDS if corpus.section_slug(f.section) == section}
    assert list(docs.ids) == sorted(corpus.section_doc_id(p, section) for p in profiles)
    assert {q.doc_id for q in qs} == set(docs.ids)
    assert {q.field for q in qs} <= fields and len(qs) >= 3 * (len(fields) - 3)
    for doc_id in docs.ids:
        asked = [q.field for q in qs if q.doc_id == doc_id]
        assert len(asked) == len(set(asked)) >= len(fields) - 3
    assert all(q.kind == "mc" and len(q.options) == questions.NUM_OPTIONS for q in qs)
