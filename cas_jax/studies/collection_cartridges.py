"""Every document's cartridge for retrieval + CAS over a whole collection, paged on a budget.

A collection of thousands of documents has trained CAS cartridges for a few of them (the
question documents of a study: `benchmarks.quality --cas` writes them to `<run>/cas/`). A
retrieved document without one reads its untrained initial cartridge instead: the cartridge
training would have started from (`collection_init.initial_cartridge`, with the trained
cartridges' P, frozen sink, init and geometry). It holds no answer; it only has to not disturb.

`CollectionCartridges` is a read-only `store.BackingStore` over both: an id reads the trained
cartridge where the trained store holds one, else the initial one, made by `ensure_initial`
(once, on the calling thread) and kept in a store of its own; `initial_id(doc)` reads the
initial one even where a trained one exists (the substitution check of issue 25).

`paged_cartridges` evaluates questions whose prefix composes the cartridges `entries[i]` with
at most `budget_share` x the bytes of the distinct cartridges the questions use on the device
(never less than the largest set): consecutive questions are grouped so that a group's
cartridges fit the budget; each group's are acquired from a `budget.BudgetManager` (the next
group's prefetched meanwhile), composed and scored by the evaluator, then released, so a
later group finds them resident (a hit) until they are evicted. Returns the result and the
paging figures (bytes read, hit rates, waits). The evaluator copies a group's acquired
cartridges into its bank (budget-sized), so the K/V held at once is about twice the budget.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from cas_jax import progress
from cas_jax.cartridges import attention
from cas_jax.cartridges.budget import BudgetManager
from cas_jax.cartridges.cartridge import Cartridge, CartridgeMeta
from cas_jax.cartridges.store import CartridgeNotFoundError, CartridgeStore, OptTemplate
from cas_jax.evaluation import evaluate, results
from cas_jax.evaluation.questions import Question
from cas_jax.evaluation.results import EvalResult
from cas_jax.model.loading import LoadedModel
from cas_jax.training.collection_init import initial_cartridge

INITIAL_PREFIX = "initial:"


def initial_id(doc_id: str) -> str:
    """The id that reads `doc_id`'s initial (untrained) cartridge, trained one or not."""
    return INITIAL_PREFIX + doc_id


def open_store(path: str, fingerprint: str | None = None) -> CartridgeStore:
    """The CartridgeStore at `path`: a store root (with STORE.json), or a training output
    folder holding one in `cartridges/` (e.g. a study's `cas/`)."""
    for root in (path, os.path.join(path, "cartridges")):
        if os.path.exists(os.path.join(root, "STORE.json")):
            return CartridgeStore(root, fingerprint)
    raise FileNotFoundError(f"{path}: no cartridge store there or in its cartridges/ "
                            "(a benchmarks.quality --cas run's cas/ folder holds one)")


@dataclasses.dataclass(frozen=True)
class InitialSettings:
    """How a document's initial cartridge is made (`collection_init.initial_cartridge`)."""

    tokens: int
    num_frozen: int = 1
    init: str = "first_tokens"
    geometry: str = "serial"


def trained_settings(store: CartridgeStore, doc_ids: Sequence[str]) -> InitialSettings:
    """The settings `doc_ids`' trained cartridges were made with, read from their manifests:
    P, frozen tokens, init (the one other than "first_tokens" if any says so: a
    document shorter than P falls back to first tokens under document_kv) and the geometry they share (`attention.common_geometry`)."""
    if not doc_ids:
        raise ValueError("no trained cartridges to read the settings of")
    metas, tokens = [], set()
    for d in doc_ids:
        _, manifest = store.manifest(d)
        metas.append(CartridgeMeta.from_dict(manifest["meta"]))
        tokens |= {a["shape"][1] for a in manifest["arrays"] if a["name"] == "keys"}
    frozen = {m.num_frozen for m in metas}
    if len(tokens) != 1 or len(frozen) != 1:
        raise ValueError(f"{store.root}: cartridges of {sorted(tokens)} tokens and "
                         f"{sorted(frozen)} frozen ones; one size is needed")
    geometry = attention.common_geometry([(m.doc_id, m.geometry) for m in metas])
    inits = {m.init for m in metas} - {"first_tokens"}
    if len(inits) > 1:
        raise ValueError(f"{store.root}: cartridges initialised by {sorted(inits)}; one init "
                         f"is needed to make the others' initial cartridges alike")
    init = inits.pop() if inits else "first_tokens"
    return InitialSettings(tokens.pop(), frozen.pop(), init, str(geometry))


class CollectionCartridges:
    """Trained cartridges where `trained` has them, initial ones elsewhere (module doc)."""

    def __init__(self, model: LoadedModel, texts: Mapping[str, str], trained: CartridgeStore,
                 initial_dir: str, settings: InitialSettings):
        self.model, self.texts, self.trained, self.settings = model, texts, trained, settings
        self.initial = CartridgeStore(initial_dir, model.fingerprint)
        self.trained_ids = frozenset(trained.list())

    def resolve(self, cid: str) -> tuple[CartridgeStore, str]:
        """(the store that holds `cid`'s cartridge, its document id)."""
        if cid.startswith(INITIAL_PREFIX):
            return self.initial, cid[len(INITIAL_PREFIX):]
        return (self.trained, cid) if cid in self.trained_ids else (self.initial, cid)

    def is_initial(self, cid: str) -> bool:
        return self.resolve(cid)[0] is self.initial

    def ensure_initial(self, ids: Sequence[str]) -> int:
        """Makes and stores every initial cartridge `ids` read that is not stored yet;
        returns how many it made."""
        todo = sorted({d for s, d in map(self.resolve, ids)
                       if s is self.initial and not s.exists(d)})
        s = self.settings
        with progress.bar(len(todo), "initial cartridges", "cartridge") as bar:
            for doc_id in todo:
                c = initial_cartridge(self.model, doc_id, self.texts[doc_id], s.tokens,
                                      s.num_frozen, s.init, s.geometry)
                self.initial.save(doc_id, c, None, step=0)
                bar.update(1)
        return len(todo)

    def nbytes(self, cid: str) -> int:
        """Bytes of `cid`'s keys and values, from its manifest (no array is read)."""
        store, doc_id = self.resolve(cid)
        _, manifest = store.manifest(doc_id)
        return sum(a["nbytes"] for a in manifest["arrays"] if a["name"] in ("keys", "values"))

    def load(self, doc_id: str, opt_template: OptTemplate = None,
             expected_fingerprint: str | None = None,
             read_opt_state: bool = True) -> tuple[Cartridge, Any, int]:
        """The cartridge of `doc_id` (an id as `resolve` reads it), without optimizer state."""
        store, doc = self.resolve(doc_id)
        if store is self.initial and not store.exists(doc):
            raise CartridgeNotFoundError(f"no initial cartridge of {doc!r} yet: "
                                         "ensure_initial makes it")
        cartridge, _, step = store.load(doc, expected_fingerprint=expected_fingerprint,
                                        read_opt_state=False)
        return cartridge, None, step

    def save(self, doc_id: str, cartridge: Cartridge, opt_state: Any = None,
             step: int = 0) -> None:
        raise TypeError("CollectionCartridges is read-only")


def plan_groups(entries: Sequence[Sequence[str]], capacity: int) -> list[list[int]]:
    """Consecutive question indices, each group's distinct cartridges at most `capacity`."""
    groups: list[list[int]] = []
    group: list[int] = []
    held: set[str] = set()
    for i, e in enumerate(entries):
        if len(set(e)) > capacity:
            raise ValueError(f"question {i} composes {len(set(e))} cartridges, more than the "
                             f"{capacity} the budget holds")
        if group and len(held | set(e)) > capacity:
            groups.append(group)
            group, held = [], set()
        group.append(i)
        held |= set(e)
    if group:
        groups.append(group)
    return groups


def budget_for(cartridges: CollectionCartridges, entries: Sequence[Sequence[str]],
               budget_share: float) -> dict[str, Any]:
    """The device budget for `entries`: `budget_share` of the bytes of the distinct
    cartridges they use, in whole cartridges of the largest size, never fewer than the
    largest set. Returns {used_cartridges, used_bytes, capacity, budget_bytes, budget_share}
    (the share actually given)."""
    used = sorted({i for e in entries for i in e})
    sizes = [cartridges.nbytes(i) for i in used]
    largest = max(len(set(e)) for e in entries)
    capacity = max(int(budget_share * len(used)), largest)
    budget = capacity * max(sizes)
    return {"used_cartridges": len(used), "used_bytes": sum(sizes), "capacity": capacity,
            "budget_bytes": budget, "budget_share": budget / sum(sizes)}


def paged_cartridges(ev: evaluate.Evaluator, questions: Sequence[Question],
                     entries: Sequence[Sequence[str]], cartridges: CollectionCartridges,
                     name: str, budget_share: float = 0.10,
                     extra: Sequence[dict] | None = None) -> tuple[EvalResult, dict]:
    """The evaluation of question i composing the cartridges `entries[i]` (ids of
    `cartridges`, best first), paged through a budget manager (module doc). `extra[i]` is
    merged into question i's record (e.g. "retrieved", "retrieval_hit") before the summary.
    Returns (the result, the paging figures)."""
    if len(entries) != len(questions) or not questions:
        raise ValueError(f"{len(questions)} questions and {len(entries)} cartridge sets")
    paging = budget_for(cartridges, entries, budget_share)
    groups = plan_groups(entries, paging["capacity"])
    slots = max(len(e) for e in entries)
    parts: list[EvalResult] = []
    with BudgetManager(cartridges, paging["budget_bytes"]) as manager:
        for g, group in enumerate(groups):
            ids = list(dict.fromkeys(i for q in group for i in entries[q]))
            acquired = manager.acquire(ids)
            if g + 1 < len(groups):
                manager.prefetch(i for q in groups[g + 1] for i in entries[q])
            table = {id(questions[q]): entries[q] for q in group}
            source = {i: c for i, (c, _) in zip(ids, acquired)}
            parts.append(ev.cartridges([questions[q] for q in group], source,
                                       lambda q: table[id(q)], name, slots=slots,
                                       capacity=paging["capacity"]))
            manager.release(ids)
        stats = manager.stats
    records: list[dict] = [{}] * len(questions)
    for group, part in zip(groups, parts):
        for q, rec in zip(group, part.records):
            records[q] = {**rec, "cartridges": list(entries[q]),
                          "initial_cartridges": sum(map(cartridges.is_initial, entries[q])),
                          **(extra[q] if extra is not None else {})}
    result = dataclasses.replace(
        results.summarise(name, records, ev.model.config.kv_bytes_per_token),
        seconds=sum(p.seconds for p in parts), compile_s=sum(p.compile_s for p in parts),
        compilations=sum(p.compilations for p in parts))
    acquired_total = stats.hits + stats.prefetch_hits + stats.misses
    paging.update(groups=len(groups), hits=stats.hits, prefetch_hits=stats.prefetch_hits,
                  misses=stats.misses, evictions=stats.evictions,
                  hit_rate=stats.hits / max(acquired_total, 1),
                  prefetch_hit_rate=stats.prefetch_hits / max(acquired_total, 1),
                  bytes_read=stats.bytes_read, bytes_in=stats.bytes_in,
                  read_s=stats.read_s, acquire_wait_s=stats.acquire_wait_s,
                  initial_share=sum(r["initial_cartridges"] for r in records)
                  / max(sum(len(e) for e in entries), 1))
    return result, paging
