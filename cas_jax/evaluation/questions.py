"""Questions about Factbook profiles, built from their structured fields, and their JSONL files.

Each question asks one field of one profile ("What is the capital of France?"), about the
profile (doc_id "fr", collection `factbook`) or about the section holding the field (doc_id
"fr-government", collection `factbook_sections`; same question text). Answers are
the field's first `;`-separated item with parentheticals, bracketed asides and notes
removed ("Tripoli (Tarabulus)" -> "Tripoli", "157 (2013)" -> "157"); a value that is empty,
"NA"/"none"/"no ...", or longer than `MAX_ANSWER_CHARS` gives no question; some fields also
keep only the part matching their `pattern` (a date must hold a year, ".fr" is extracted).

Fields come in groups (`FIELD_GROUPS`), in the order they were added: the first holds the fields
every recorded study drew its questions from (its Geography questions, 13 fields a section); the
second (issue 25) makes People and Society (15 fields) and Government (12) sections studies of
their own. Each group draws with its own random stream, so adding a group leaves the questions of
the earlier ones unchanged.

Multiple choice ("mc"): the gold answer plus 3 distractors, the same field's values for other
Factbook profiles (distinct from the gold and from each other, case-insensitively), in a
seeded random order. Free answer ("free"): the gold text only.

JSONL, one question per line (extra keys are allowed and ignored on reading):
  {"doc_id": "fr", "question": "...", "options": ["...", "...", "...", "..."], "answer": 2,
   "field": "capital", "gold": "Paris"}        # multiple choice; answer = index of the gold
  {"doc_id": "fr", "question": "...", "gold": "Paris", "field": "capital"}   # free answer
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cas_jax.documents import corpus

KINDS = ("mc", "free")
NUM_OPTIONS = 4
MAX_ANSWER_CHARS = 60

_NOTE = re.compile(r"[;:,]?\s*\bnote\b\s*[-:].*", re.IGNORECASE | re.DOTALL)
_ASIDE = re.compile(r"\s*(\([^()]*\)|\[[^\[\]]*\])")
_EMPTY_VALUES = frozenset({"", "na", "n/a", "none", "unknown", "-"})


@dataclasses.dataclass(frozen=True)
class Question:
    """One question about document `doc_id`; multiple choice iff `options` is set.

    `answer` is the index of `gold` in `options` (multiple choice), else None. `field` names
    the Factbook field asked, or is None for questions from elsewhere.
    """

    doc_id: str
    question: str
    gold: str
    field: str | None = None
    options: tuple[str, ...] | None = None
    answer: int | None = None

    def __post_init__(self):
        if (self.options is None) != (self.answer is None):
            raise ValueError("a question needs both 'options' and 'answer', or neither")
        if self.options is not None:
            if len(self.options) < 2:
                raise ValueError(f"expected at least 2 options, got {len(self.options)}")
            if not 0 <= self.answer < len(self.options):
                raise ValueError(f"expected 'answer' in [0, {len(self.options)}), got {self.answer}")
            if self.options[self.answer] != self.gold:
                raise ValueError(f"'gold' {self.gold!r} is not options[answer] "
                                 f"{self.options[self.answer]!r}")

    @property
    def kind(self) -> str:
        return "free" if self.options is None else "mc"

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"doc_id": self.doc_id, "question": self.question}
        if self.options is not None:
            obj.update(options=list(self.options), answer=self.answer)
        obj["gold"] = self.gold
        if self.field is not None:
            obj["field"] = self.field
        return obj


@dataclasses.dataclass(frozen=True)
class FactField:
    """A profile field: `paths` are tried in order, each a key path to a {"text": ...} node.

    All paths start with the same key, the profile section holding the field (`section`).
    """

    name: str
    paths: tuple[tuple[str, ...], ...]
    template: str  # formatted with {name}, the profile's title
    pattern: str = ".+"  # the answer is this regex's first match in the cleaned value

    def __post_init__(self):
        sections = {path[0] for path in self.paths}
        if len(sections) != 1:
            raise ValueError(f"field {self.name!r}: paths must all start with one section, got {sections}")

    @property
    def section(self) -> str:
        """The top-level profile key ("Government") under which every path of the field lies."""
        return self.paths[0][0]

    def value(self, profile: Mapping[str, Any]) -> str | None:
        """The cleaned answer for `profile`, or None if the field is absent or unusable."""
        for path in self.paths:
            node: Any = profile
            for key in path:
                node = node.get(key) if isinstance(node, dict) else None
            text = node.get("text") if isinstance(node, dict) else None
            if isinstance(text, str):
                answer = clean_answer(text)
                match = re.search(self.pattern, answer) if answer else None
                return match.group(0) if match else None
        return None


_RECORDED_FIELDS = (
    FactField("capital", (("Government", "Capital", "name"),), "What is the capital of {name}?"),
    FactField("total_area", (("Geography", "Area", "total"),), "What is the total area of {name}?"),
    FactField("coastline", (("Geography", "Coastline"), ("Geography", "Coastline", "total")),
              "How long is the coastline of {name}?"),
    FactField("highest_point", (("Geography", "Elevation extremes", "highest point"),),
              "What is the highest point of {name}, and its elevation?"),
    FactField("lowest_point", (("Geography", "Elevation extremes", "lowest point"),),
              "What is the lowest point of {name}, and its elevation?"),
    FactField("national_holiday", (("Government", "National holiday"),),
              "What is the national holiday of {name}, and its date?", pattern=r".*\d.*"),
    FactField("independence", (("Government", "Independence"),), "When did {name} become independent?",
              pattern=r".*\d{3,4}.*"),
    FactField("national_anthem", (("Government", "National anthem", "name"),),
              "What is the name of the national anthem of {name}?"),
    FactField("internet_code", (("Communications", "Internet country code"),),
              "What is the Internet country code of {name}?", pattern=r"\.[a-z]{2,3}\b"),
    FactField("airports", (("Transportation", "Airports"),), "How many airports does {name} have?"),
    FactField("population", (("People and Society", "Population"),), "What is the population of {name}?"),
    FactField("population_growth_rate", (("People and Society", "Population growth rate"),),
              "What is the population growth rate of {name}?"),
    FactField("birth_rate", (("People and Society", "Birth rate"),), "What is the birth rate of {name}?"),
    FactField("median_age", (("People and Society", "Median age", "total"),),
              "What is the median age of the population of {name}?"),
    FactField("life_expectancy", (("People and Society", "Life expectancy at birth", "total population"),),
              "What is the life expectancy at birth in {name}?"),
    # Geography fields beyond the first four (added in session 7): a Geography section then
    # holds up to 13 question fields, spread over the whole section rather than its first lines.
    FactField("geographic_coordinates", (("Geography", "Geographic coordinates"),),
              "What are the geographic coordinates of {name}?",
              pattern=r"\d+ \d+ [NS], \d+ \d+ [EW]"),
    FactField("land_area", (("Geography", "Area", "land"),), "What is the land area of {name}?"),
    FactField("water_area", (("Geography", "Area", "water"),), "What is the water area of {name}?"),
    FactField("area_comparative", (("Geography", "Area - comparative"),),
              "How does the area of {name} compare in size?"),
    FactField("land_boundaries", (("Geography", "Land boundaries", "total"),
                                  ("Geography", "Land boundaries")),
              "What is the total length of the land boundaries of {name}?", pattern=r"[\d,.]+ km"),
    FactField("agricultural_land", (("Geography", "Land use", "agricultural land"),),
              "What share of the land of {name} is agricultural land?", pattern=r"[\d.]+%"),
    FactField("forest", (("Geography", "Land use", "forest"),),
              "What share of the land of {name} is forest?", pattern=r"[\d.]+%"),
    FactField("irrigated_land", (("Geography", "Irrigated land"),),
              "How much irrigated land does {name} have?", pattern=r".*\d.*"),
    FactField("renewable_water", (("Geography", "Total renewable water resources"),),
              "What are the total renewable water resources of {name}?",
              pattern=r"[\d.,]+ cu km"),
)
_PEOPLE, _GOVERNMENT = "People and Society", "Government"
_SECTION_FIELDS = (
    # People and Society: 10 more (15 with the 5 above); answers are the figure and its unit,
    # or the bare figure where the unit has a "(s)" that cleaning would cut.
    FactField("death_rate", ((_PEOPLE, "Death rate"),), "What is the death rate of {name}?"),
    FactField("net_migration_rate", ((_PEOPLE, "Net migration rate"),),
              "What is the net migration rate of {name}, in migrants per 1,000 population?",
              pattern=r"^-?[\d.]+(?= migrant)"),
    FactField("total_fertility_rate", ((_PEOPLE, "Total fertility rate"),),
              "What is the total fertility rate of {name}?"),
    FactField("infant_mortality_rate", ((_PEOPLE, "Infant mortality rate", "total"),),
              "What is the infant mortality rate of {name}?"),
    FactField("urban_population", ((_PEOPLE, "Urbanization", "urban population"),),
              "What share of the population of {name} is urban?", pattern=r"^[\d.]+%"),
    FactField("urbanization_rate", ((_PEOPLE, "Urbanization", "rate of urbanization"),),
              "What is the annual rate of urbanization of {name}?", pattern=r"^-?[\d.]+%"),
    FactField("major_urban_area", ((_PEOPLE, "Major urban areas - population"),),
              "What is the first major urban area listed for {name}, and its population?"),
    FactField("dependency_ratio", ((_PEOPLE, "Dependency ratios", "total dependency ratio"),),
              "What is the total dependency ratio of {name}?", pattern=r"^[\d.]+%"),
    FactField("population_0_14", ((_PEOPLE, "Age structure", "0-14 years"),),
              "What share of the population of {name} is 0-14 years old?", pattern=r"^[\d.]+%"),
    FactField("obesity_rate", ((_PEOPLE, "Obesity - adult prevalence rate"),),
              "What is the adult obesity prevalence rate of {name}?", pattern=r"^[\d.]+%"),
    # Government: 8 more (12 with capital, national holiday, independence and anthem).
    FactField("long_name", ((_GOVERNMENT, "Country name", "conventional long form"),),
              "What is the conventional long-form name of {name}?"),
    FactField("government_type", ((_GOVERNMENT, "Government type"),),
              "What is the government type of {name}?"),
    FactField("legal_system", ((_GOVERNMENT, "Legal system"),),
              "What is the legal system of {name}?"),
    FactField("chief_of_state", ((_GOVERNMENT, "Executive branch", "chief of state"),),
              "Who is the chief of state of {name}?"),
    FactField("head_of_government", ((_GOVERNMENT, "Executive branch", "head of government"),),
              "Who is the head of government of {name}?"),
    FactField("suffrage_age", ((_GOVERNMENT, "Suffrage"),), "At what age does suffrage begin in {name}?",
              pattern=r"^\d+ years of age"),
    FactField("administrative_divisions", ((_GOVERNMENT, "Administrative divisions"),),
              "How many administrative divisions does {name} have, and of what kind?",
              pattern=r"^\d.*"),
    FactField("national_symbol", ((_GOVERNMENT, "National symbol(s)"),),
              "What is a national symbol of {name}?", pattern=r"^(?!national colou?rs?:).+"),
)
FIELD_GROUPS = (_RECORDED_FIELDS, _SECTION_FIELDS)
"""Question fields in the order they were added; `generate_factbook_questions` draws each group
with its own random stream (the first with `seed` itself, as every recorded study did)."""
FIELDS = tuple(f for group in FIELD_GROUPS for f in group)
FIELD_NAMES = tuple(f.name for f in FIELDS)
_FIELDS_BY_NAME = {f.name: f for f in FIELDS}


def clean_answer(text: str) -> str | None:
    """First `;` item of a field value without notes, (asides), [asides] or quotes; None if empty."""
    text = _NOTE.sub("", text)
    while True:
        stripped = _ASIDE.sub("", text)
        if stripped == text:
            break
        text = stripped
    text = re.sub(r"\s+", " ", text.split(";")[0].replace('"', "")).strip(" ,:")
    if text.casefold() in _EMPTY_VALUES or text.casefold().startswith(("none ", "no ")) \
            or len(text) > MAX_ANSWER_CHARS:
        return None
    return text


def field_values(field: str, cache_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """doc_id -> cleaned answer of `field`, for every Factbook profile that has one."""
    if field not in _FIELDS_BY_NAME:
        raise ValueError(f"unknown field {field!r}; expected one of {FIELD_NAMES}")
    values = {}
    for doc_id, profile in corpus.factbook_profiles(cache_dir).items():
        value = _FIELDS_BY_NAME[field].value(profile)
        if value is not None:
            values[doc_id] = value
    return values


def generate_factbook_questions(collection_or_ids: corpus.Collection | Iterable[str], num_per_doc: int,
                                seed: int, kinds: Iterable[str] = ("mc",),
                                cache_dir: str | os.PathLike | None = None) -> list[Question]:
    """Up to `num_per_doc` questions per document and kind, on distinct fields.

    A document is a profile id ("fr": any field) or a `factbook_sections` id ("fr-government":
    only fields held by that section, so most sections give none); each question's doc_id is
    the id asked for. Fields are drawn per document without replacement from those it has (so
    a sparse profile may give fewer), group by group (`FIELD_GROUPS`): a later group's fields
    only fill what the earlier ones leave of `num_per_doc`, and each group draws from its own
    stream seeded from `seed`, so the questions of earlier groups do not depend on later ones.
    Each drawn field gives one question of every kind in `kinds`. Distractors come from all 261
    profiles, not only the requested ones. Same arguments, same questions.
    """
    ids = list(collection_or_ids.ids if isinstance(collection_or_ids, corpus.Collection)
               else collection_or_ids)
    kinds = tuple(kinds)
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds}")
    if isinstance(num_per_doc, bool) or not isinstance(num_per_doc, int) or num_per_doc < 1:
        raise ValueError(f"num_per_doc must be a positive int, got {num_per_doc!r}")
    profiles = corpus.factbook_profiles(cache_dir)
    titles = corpus.factbook_titles(cache_dir)
    sections = corpus.factbook_section_index(cache_dir)
    unknown = [i for i in ids if i not in profiles and i not in sections]
    if unknown:
        raise ValueError(f"unknown Factbook document ids {unknown}; expected profile ids, e.g. "
                         f"{list(profiles)[:5]}, or section ids, e.g. fr-government")
    values = {f.name: field_values(f.name, cache_dir) for f in FIELDS}
    rngs = [np.random.default_rng(seed if g == 0 else (seed, g)) for g in range(len(FIELD_GROUPS))]
    questions = []
    for doc_id in ids:
        profile_id, section = sections[doc_id] if doc_id in sections else (doc_id, None)
        left = num_per_doc
        for group, rng in zip(FIELD_GROUPS, rngs):
            fields = [f for f in group if profile_id in values[f.name] and section in (None, f.section)]
            drawn = rng.permutation(len(fields))[:left]
            left -= len(drawn)
            for i in drawn:
                field = fields[i]
                questions += _field_questions(doc_id, profile_id, field.template.format(
                    name=titles[profile_id]), field.name, values[field.name], kinds, rng)
    return questions


def _field_questions(doc_id: str, profile_id: str, text: str, field: str, values: Mapping[str, str],
                     kinds: tuple[str, ...], rng: np.random.Generator) -> list[Question]:
    """The questions of every kind in `kinds` asking `text` of `profile_id`, whose answer is
    `values[profile_id]`; multiple choice draws its distractors and order from `rng`."""
    gold = values[profile_id]
    questions = []
    for kind in kinds:
        if kind == "free":
            questions.append(Question(doc_id, text, gold, field))
            continue
        options = [gold, *_distractors(gold, profile_id, values, rng)]
        order = rng.permutation(NUM_OPTIONS)
        options = [options[j] for j in order]
        questions.append(Question(doc_id, text, gold, field, tuple(options), options.index(gold)))
    return questions


def to_section_questions(questions: Iterable[Question],
                         cache_dir: str | os.PathLike | None = None) -> list[Question]:
    """Questions written for `factbook` re-addressed to `factbook_sections`.

    Each question's doc_id (a profile id, "fr") becomes the id of the section holding its
    `field` ("capital" -> "fr-government"); text, options and answer are kept. A question whose
    field is None or not in FIELD_NAMES, whose doc_id is not a profile id, or whose profile
    has no such section raises ValueError naming the question.
    """
    profiles = corpus.factbook_profiles(cache_dir)
    sections = corpus.factbook_section_index(cache_dir)
    mapped = []
    for q in questions:
        if q.field not in _FIELDS_BY_NAME:
            raise ValueError(f"question {q.question!r} about {q.doc_id!r} has field {q.field!r}; "
                             f"expected one of {FIELD_NAMES} to find its section")
        if q.doc_id not in profiles:
            raise ValueError(f"question {q.question!r} has doc_id {q.doc_id!r}, not a Factbook "
                             f"profile id (e.g. {list(profiles)[:5]})")
        section_id = corpus.section_doc_id(q.doc_id, _FIELDS_BY_NAME[q.field].section)
        if section_id not in sections:
            raise ValueError(f"question {q.question!r}: profile {q.doc_id!r} has no section "
                             f"{section_id!r} holding field {q.field!r}")
        mapped.append(dataclasses.replace(q, doc_id=section_id))
    return mapped


def _distractors(gold: str, doc_id: str, values: Mapping[str, str], rng: np.random.Generator) -> list[str]:
    """NUM_OPTIONS - 1 values of other profiles, distinct from `gold` and each other (casefolded)."""
    pool: dict[str, str] = {}
    for other, value in sorted(values.items()):
        if other != doc_id and value.casefold() != gold.casefold():
            pool.setdefault(value.casefold(), value)
    candidates = sorted(pool.values())
    picks = rng.choice(len(candidates), size=NUM_OPTIONS - 1, replace=False)
    return [candidates[j] for j in picks]


def write_questions(path: str | os.PathLike, questions: Iterable[Question]) -> None:
    """Writes one JSON object per line (UTF-8), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for q in questions:
            f.write(json.dumps(q.to_json(), ensure_ascii=False) + "\n")


def read_questions(path: str | os.PathLike) -> list[Question]:
    """Reads and validates a JSONL question file; blank lines are skipped.

    A malformed line raises ValueError "FILE:LINE: expected ..., got ...". Multiple choice
    lines need "options" (list of >= 2 strings) and "answer" (int index); "gold" is optional
    there and, if given, must equal options[answer]. Free-answer lines need "gold".
    """
    path = Path(path)
    questions = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                questions.append(_parse_question(line))
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
    return questions


def _parse_question(line: str) -> Question:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"expected a JSON object, got invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    for key in ("doc_id", "question"):
        _expect_text(obj, key)
    if obj.get("field") is not None and not isinstance(obj["field"], str):
        raise ValueError(f"expected 'field' to be a string, got {obj['field']!r}")
    if "options" not in obj and "answer" not in obj:
        if "gold" not in obj:
            raise ValueError("expected 'options' and 'answer' (multiple choice) or 'gold' (free answer)")
        return Question(obj["doc_id"], obj["question"], _expect_text(obj, "gold"), obj.get("field"))
    options, answer = obj.get("options"), obj.get("answer")
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
        raise ValueError(f"expected 'options' to be a list of at least 2 strings, got {options!r}")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(options):
        raise ValueError(f"expected 'answer' to be an int index in [0, {len(options)}), got {answer!r}")
    gold = obj.get("gold", options[answer])
    if gold != options[answer]:
        raise ValueError(f"expected 'gold' to equal options[answer] {options[answer]!r}, got {gold!r}")
    return Question(obj["doc_id"], obj["question"], gold, obj.get("field"), tuple(options), answer)


def _expect_text(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected {key!r} to be a non-empty string, got {value!r}")
    return value
