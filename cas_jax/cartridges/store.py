"""A store of cartridges: one cartridge directory (`cas_jax.cartridges.files`) per id.

A store (`CartridgeStore(root)`):
  <root>/STORE.json                  {"format": "cas_jax.store/1"}
  <root>/cartridges/<quoted id>/     the cartridge directory of `id`
  <root>/documents/<quoted id>.txt   the text of the document `id` stands for (optional: what
                                     a routing geometry scores a question against)
where <quoted id> is `urllib.parse.quote(doc_id, safe="")` with a leading "." written "%2E".
Reading or writing one cartridge touches only its directory. One process writes a store; within
it, calls are thread-safe (one lock per cartridge id). A reader in another process keeps reading
the version it started with unless two more saves of that cartridge complete meanwhile.

`BackingStore` is the interface `budget.BudgetManager` pages through (load and save by id):
a `CartridgeStore` is one, and so is `pending_store.PendingStore` (a store whose writes wait
for a checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import urllib.parse
from typing import Any, Protocol, runtime_checkable

from cas_jax.cartridges.cartridge import Cartridge, CartridgeMismatchError, check_compatible
from cas_jax.cartridges.files import (CURRENT, CartridgeNotFoundError, CartridgeStoreError,
                                      CorruptCartridgeError, OptStateMismatchError, OptTemplate,
                                      cached_opt_template, collect_garbage, link_version,
                                      live_manifest, load_cartridge, read_version,
                                      save_cartridge, write_version)

# The store is the persistence API: it also hands out the one-directory functions and errors.
__all__ = ["CURRENT", "DOCUMENTS", "STORE_FORMAT", "BackingStore", "CartridgeNotFoundError",
           "CartridgeStore", "CartridgeStoreError", "CorruptCartridgeError",
           "OptStateMismatchError", "OptTemplate", "VerifyReport", "cached_opt_template",
           "documents_of", "load_cartridge", "load_for_model", "save_cartridge"]

STORE_FORMAT = "cas_jax.store/1"
DOCUMENTS = "documents"
_MAX_DIR_NAME = 200


def _quoted(doc_id: str) -> str:
    """`doc_id` as a file name (module doc); ValueError for an id no file name can hold."""
    if not isinstance(doc_id, str) or not doc_id:
        raise ValueError(f"cartridge id must be a non-empty string, got {doc_id!r}")
    name = urllib.parse.quote(doc_id, safe="")
    if name.startswith("."):
        name = "%2E" + name[1:]
    if len(name) > _MAX_DIR_NAME:
        raise ValueError(f"cartridge id {doc_id!r} is too long: quoted it has {len(name)} "
                         f"characters, at most {_MAX_DIR_NAME} fit a directory name")
    return name


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """Result of `CartridgeStore.verify`: ids that loaded cleanly, an error message per failure."""

    ok: tuple[str, ...]
    errors: dict[str, str]

    @property
    def all_ok(self) -> bool:
        return not self.errors


@runtime_checkable
class BackingStore(Protocol):
    """What `budget.BudgetManager` reads cartridges from and writes them back to: `load` as
    `CartridgeStore.load` (host arrays; the optimizer state restored into `opt_template`, None
    when `read_opt_state` is False) and `save` as `CartridgeStore.save`. `CartridgeStore` and
    `pending_store.PendingStore` implement it."""

    def load(self, doc_id: str, opt_template: OptTemplate = None,
             expected_fingerprint: str | None = None,
             read_opt_state: bool = True) -> tuple[Cartridge, Any, int]: ...

    def save(self, doc_id: str, cartridge: Cartridge, opt_state: Any = None,
             step: int = 0) -> None: ...


class CartridgeStore:
    """Many cartridges (with optimizer state and step) under one root directory.

    `model_fingerprint`, if given, is checked on every save and (unless overridden) every load.
    Loaded arrays are host numpy arrays; page them onto devices with `budget.BudgetManager`.
    """

    def __init__(self, root: str, model_fingerprint: str | None = None):
        self.root = os.path.abspath(root)
        self.model_fingerprint = model_fingerprint
        self._cartridges_dir = os.path.join(self.root, "cartridges")
        marker = os.path.join(self.root, "STORE.json")
        if os.path.exists(marker):
            with open(marker) as f:
                fmt = json.load(f).get("format")
            if fmt != STORE_FORMAT:
                raise CartridgeStoreError(f"{marker}: format {fmt!r}, expected {STORE_FORMAT!r}")
        elif os.path.isdir(self.root) and os.listdir(self.root):
            raise CartridgeStoreError(f"{self.root} is a non-empty directory without STORE.json")
        else:
            os.makedirs(self.root, exist_ok=True)
            with open(marker + ".tmp", "w") as f:
                json.dump({"format": STORE_FORMAT}, f)
            os.replace(marker + ".tmp", marker)
        os.makedirs(self._cartridges_dir, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        # {cartridge dir: (version, manifest)} of versions this object wrote or read: loading
        # the same version again skips its manifest (version files are immutable).
        self._known: dict[str, tuple[str, dict[str, Any]]] = {}

    def _lock(self, doc_id: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(doc_id, threading.Lock())

    def cartridge_dir(self, doc_id: str) -> str:
        """The cartridge directory of `doc_id` (also loadable with `load_cartridge`)."""
        return os.path.join(self._cartridges_dir, _quoted(doc_id))

    def document_path(self, doc_id: str) -> str:
        """Where `save_document` records the text of the document `doc_id` stands for."""
        return os.path.join(self.root, DOCUMENTS, _quoted(doc_id) + ".txt")

    def save_document(self, doc_id: str, text: str) -> None:
        """Records (atomically) the text of the document `doc_id` stands for: a reader of
        this store under a routing geometry scores a question against it."""
        if not isinstance(text, str):
            raise TypeError(f"document {doc_id!r}: text must be a string, got {type(text)}")
        path = self.document_path(doc_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)

    def documents(self) -> dict[str, str]:
        """id -> text of every document recorded by `save_document`, sorted by id (empty for
        a store that records none). CartridgeStoreError names a file that is not UTF-8."""
        folder = os.path.join(self.root, DOCUMENTS)
        if not os.path.isdir(folder):
            return {}
        texts = {}
        for name in os.listdir(folder):
            if not name.endswith(".txt") or name.startswith("."):
                continue
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    texts[urllib.parse.unquote(name[:-4])] = f.read()
            except UnicodeDecodeError as e:
                raise CartridgeStoreError(f"{DOCUMENTS}/{name} of store {self.root}: not UTF-8 "
                                          f"text ({e})") from None
        return dict(sorted(texts.items()))

    def exists(self, doc_id: str) -> bool:
        return os.path.exists(os.path.join(self.cartridge_dir(doc_id), CURRENT))

    def list(self) -> list[str]:
        """Ids of all cartridges with a completed save, sorted."""
        return sorted(urllib.parse.unquote(name) for name in os.listdir(self._cartridges_dir)
                      if not name.startswith(".")
                      and os.path.exists(os.path.join(self._cartridges_dir, name, CURRENT)))

    def save(self, doc_id: str, cartridge: Cartridge, opt_state: Any = None,
             step: int = 0) -> None:
        """Atomically stores a new version of `doc_id` (keys/values, optimizer state, step).

        `opt_state` is any pytree of arrays (e.g. optax state) or None. Keeps the previous version
        and deletes older ones.
        """
        if cartridge.meta.doc_id and cartridge.meta.doc_id != doc_id:
            raise ValueError(
                f"cartridge for document {cartridge.meta.doc_id!r} saved as {doc_id!r}")
        if (self.model_fingerprint is not None
                and cartridge.meta.model_fingerprint != self.model_fingerprint):
            raise CartridgeMismatchError(
                f"cartridge {doc_id!r}: made for model {cartridge.meta.model_fingerprint}, "
                f"store {self.root} holds model {self.model_fingerprint}")
        with self._lock(doc_id):
            directory = self.cartridge_dir(doc_id)
            self._known[directory] = write_version(directory, cartridge, opt_state, step,
                                                   doc_id)

    def adopt(self, doc_id: str, source: "CartridgeStore", opt_template: OptTemplate = None
              ) -> None:
        """Makes `source`'s live version of `doc_id` this store's live version, atomically as
        `save` does: by hard links when both stores share a filesystem (no bytes read or
        written), else by loading it (all checksums checked) and saving it here."""
        label = f"cartridge {doc_id!r}"
        with self._lock(doc_id), source._lock(doc_id):
            directory = self.cartridge_dir(doc_id)
            linked = link_version(source.cartridge_dir(doc_id), directory, label,
                                  self.model_fingerprint, doc_id)
            if linked is not None:
                self._known[directory] = linked
                return
        self.save(doc_id, *source.load(doc_id, opt_template))

    def load(self, doc_id: str, opt_template: OptTemplate = None,
             expected_fingerprint: str | None = None,
             read_opt_state: bool = True) -> tuple[Cartridge, Any, int]:
        """Returns (Cartridge, optimizer state, step) of `doc_id`'s live version, as host arrays.

        The optimizer state is None if none was saved or `read_opt_state` is False; otherwise a
        {tree_path: array} dict, or restored into `opt_template`'s structure (a pytree, or a
        function of the Cartridge giving one). Raises CartridgeNotFoundError,
        CorruptCartridgeError, or CartridgeMismatchError when the fingerprint differs from
        `expected_fingerprint` (default: the store's). Every array read is checked against
        its CRC-32C; the manifest of a version this object wrote or read before is not read
        again (`verify` always reads it).
        """
        return self._load(doc_id, opt_template, expected_fingerprint, read_opt_state,
                          self._known)

    def _load(self, doc_id, opt_template, expected_fingerprint, read_opt_state, known):
        if expected_fingerprint is None:
            expected_fingerprint = self.model_fingerprint
        with self._lock(doc_id):
            return read_version(self.cartridge_dir(doc_id), f"cartridge {doc_id!r}",
                                expected_fingerprint, read_opt_state, opt_template, doc_id,
                                known)

    def manifest(self, doc_id: str) -> tuple[str, dict[str, Any]]:
        """(version, manifest) of `doc_id`'s live version, without reading its arrays: the
        manifest's "meta" (CartridgeMeta fields) and "arrays" (name, shape, dtype, nbytes).
        A version this object wrote or read before costs a read of CURRENT only. Raises
        ValueError for an id no directory can hold, CartridgeNotFoundError, or
        CorruptCartridgeError (a garbled CURRENT or manifest)."""
        directory = self.cartridge_dir(doc_id)
        with self._lock(doc_id):
            return live_manifest(directory, f"cartridge {doc_id!r}", self._known)

    def load_cartridge(self, doc_id: str, expected_fingerprint: str | None = None) -> Cartridge:
        """The Cartridge alone of `doc_id` (its optimizer state is not read); see `load`."""
        return self.load(doc_id, expected_fingerprint=expected_fingerprint,
                         read_opt_state=False)[0]

    def delete(self, doc_id: str) -> None:
        """Removes all versions of `doc_id` (CURRENT goes first, so it vanishes atomically)."""
        directory = self.cartridge_dir(doc_id)
        with self._lock(doc_id):
            self._known.pop(directory, None)  # a new cartridge here restarts at v00000001
            try:
                os.remove(os.path.join(directory, CURRENT))
            except FileNotFoundError:
                raise CartridgeNotFoundError(
                    f"cartridge {doc_id!r}: not in store {self.root}") from None
            collect_garbage(directory, keep=set())
            os.rmdir(directory)

    def verify(self, doc_id: str | None = None,
               expected_fingerprint: str | None = None) -> VerifyReport:
        """Fully reads `doc_id` (or every cartridge) and checks every checksum; never raises for
        a bad cartridge, but lists it with its error."""
        ok, errors = [], {}
        for i in ([doc_id] if doc_id is not None else self.list()):
            try:
                self._load(i, None, expected_fingerprint, True, None)
                ok.append(i)
            except (CartridgeStoreError, CartridgeMismatchError) as e:
                errors[i] = str(e)
        return VerifyReport(ok=tuple(ok), errors=errors)


def documents_of(cartridge_dir: str) -> dict[str, str]:
    """The documents recorded by the store that holds the cartridge directory `cartridge_dir`
    (`<root>/cartridges/<id>`); empty when it is not in a store."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(cartridge_dir)))
    if not os.path.exists(os.path.join(root, "STORE.json")):
        return {}
    return CartridgeStore(root).documents()


def load_for_model(path: str, model) -> Cartridge:
    """The cartridge at directory `path` for `model` (a `loading.LoadedModel`), every array
    CRC-checked; CartridgeMismatchError naming `path` if it was made for another model or its
    shape does not fit this one."""
    c = load_cartridge(path, expected_fingerprint=model.fingerprint)
    cfg = model.config
    check_compatible(c, model.fingerprint, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                     name=f"cartridge {path}")
    return c
