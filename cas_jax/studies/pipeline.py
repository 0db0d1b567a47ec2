"""The end-to-end stages shared by `experiments.pipeline` and the quality study
(`cas_jax.studies.study`, `benchmarks.quality`): self-study synthesis of a collection, CAS
training of its cartridges, and evaluation.

Each stage resumes from what is already complete in its output folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

from cas_jax.cartridges.attention import DEFAULT_GEOMETRY, Geometry
from cas_jax.cartridges.store import CartridgeStore
from cas_jax.documents.corpus import Collection
from cas_jax.evaluation import evaluate
from cas_jax.evaluation.questions import Question
from cas_jax.evaluation.results import EvalResult
from cas_jax.model.loading import LoadedModel
from cas_jax.training import synthesis, train
from cas_jax.training.distractors import DistractorSchedule, composed_sets
from cas_jax.training.train_collection import (CollectionConfig, CollectionReport, document_tokens,
                                               initialise_store, train_collection)


SPANS_ONLY = tuple(float(f == synthesis.SPANS) for f in synthesis.FAMILIES)
"""Family weights (`synthesis.FAMILIES` order) that synthesise span conversations only."""


SYNTHESIS = synthesis.SynthesisConfig(chunk_min=1024, chunk_max=1024, max_user_tokens=48,
                                      max_answer_tokens=96, family_weights=SPANS_ONLY,
                                      no_repeat_ngram_size=4)
READ_GEOMETRY = Geometry("parallel", count_power=0.5, relevance=4, relevance_floor=1)
"""Issue 24's choice (BUILD_NOTES "Composition"): queries after the longest cartridge, the
prefix weighed by n ** -0.5, and relevance routing whose distances are floored by the best
score (so an unsure retriever's set is barely routed)."""
COLLECTION = CollectionConfig(tokens_per_doc=64, batch_size=4, seq_len=320, steps=48,
                              distractors=DistractorSchedule(k_max=2),
                              read_geometry=READ_GEOMETRY)
TRAIN = train.TrainConfig(lr=2e-2)
"""The sections of the default PipelineConfig."""

FLAT = {
    "conversations_per_doc": "conversations_per_doc", "chunk_min": "synthesis.chunk_min",
    "chunk_max": "synthesis.chunk_max", "max_user_tokens": "synthesis.max_user_tokens",
    "max_answer_tokens": "synthesis.max_answer_tokens", "synthesis_batch": "synthesis_batch",
    "tokens_per_doc": "collection.tokens_per_doc", "distractors": "collection.distractors.k_max",
    "steps": "collection.steps", "batch": "collection.batch_size",
    "seq_len": "collection.seq_len", "lr": "train.lr",
    "budget_bytes": "collection.budget_bytes", "top_k": "top_k", "seed": "seed",
    "family_weights": "synthesis.family_weights", "span_turns": "synthesis.span_turns",
    "no_repeat_ngram_size": "synthesis.no_repeat_ngram_size",
    "repetition_penalty": "synthesis.repetition_penalty", "init": "collection.init",
    "distractor_schedule": "collection.distractors.kind",
    "ramp_steps": "collection.distractors.ramp_steps", "grad_scope": "collection.grad_scope",
    "p_iso": "collection.distractors.p_iso", "quiet": "collection.distractors.quiet",
    "geometry": "train.geometry"}
"""The flat view: short name -> field path. These names are read as attributes
(`cfg.steps`), accepted as keyword arguments of PipelineConfig and `dataclasses.replace`, name
the launchers' flags, and are the keys of `stamp` (in this order, that of the flat
PipelineConfig that recorded results were stamped with)."""

DERIVED = ("collection.seed", "collection.checkpoint_every", "train.total_steps")
"""Section fields the pipeline sets itself: every stage uses the run's `seed`, checkpoints 4
times per run and schedules the learning rate over `collection.steps`."""


@dataclasses.dataclass(frozen=True, init=False)
class PipelineConfig:
    """Settings of every stage, as the stages' own configs: `synthesis` (self-study),
    `collection` (CAS training: P, batch, steps, the distractor schedule, budget) and `train`
    (optimisation, composition geometry), plus what the pipeline alone reads. Defaults are
    the 2-core CPU demo and the recipe of docs/log.md ("Session 4: cartridges that work"): span
    conversations only (the 135M model's generated answers carry little of the document),
    whole short documents as chunks, P=64.

    Built with keywords: section fields, and the flat names of `FLAT` (`steps=10`, applied
    after the sections); `DERIVED` fields follow `seed` and `collection.steps`."""

    synthesis: synthesis.SynthesisConfig = SYNTHESIS
    collection: CollectionConfig = COLLECTION
    train: train.TrainConfig = TRAIN
    conversations_per_doc: int = 24
    """Self-study conversations per document."""
    synthesis_batch: int = 16
    """Conversations generated together."""
    top_k: int = 2
    """Documents / chunks retrieved per question."""
    seed: int = 0
    """Seed of synthesis, training (`collection.seed`) and questions."""

    def __init__(self, **kw):
        own = {f.name for f in dataclasses.fields(PipelineConfig)}
        unknown = sorted(set(kw) - own - set(FLAT))
        if unknown:
            raise TypeError(f"PipelineConfig: unknown settings {unknown}")
        for f in dataclasses.fields(PipelineConfig):
            object.__setattr__(self, f.name, kw.get(f.name, f.default))
        changes: dict = {}
        for name, value in kw.items():
            if name not in own:
                *parents, leaf = FLAT[name].split(".")
                node = changes
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = value
        changes.setdefault("collection", {})["seed"] = self.seed
        for name, sub in changes.items():
            object.__setattr__(self, name, _with(getattr(self, name), sub))
        steps = self.collection.steps
        object.__setattr__(self, "collection", _with(
            self.collection, {"checkpoint_every": max(steps // 4, 1)}))
        object.__setattr__(self, "train", _with(self.train, {"total_steps": steps}))


def _with(obj, changes: dict):
    """`obj` with nested `changes` ({field: value or {field: ...}}), each dataclass replaced
    once (so its validation sees all its changes together)."""
    if not isinstance(changes, dict):
        return changes
    out = {k: _with(getattr(obj, k), v) for k, v in changes.items()}
    if all(getattr(obj, k) == v for k, v in out.items()):
        return obj
    return dataclasses.replace(obj, **out)


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


for _name, _path in FLAT.items():
    if "." in _path:
        setattr(PipelineConfig, _name, property(lambda self, _p=_path: _get(self, _p),
                                                doc=f"`{_path}` (the flat view, FLAT)"))


LATER_FIELDS = ("p_iso", "quiet", "geometry")
"""Flat settings added after results were recorded: `stamp` leaves them out while they hold
their defaults, so the recorded results still match the configs that made them."""


def read_geometry(cfg: PipelineConfig) -> Geometry:
    """The geometry cartridges trained under `cfg` are composed by wherever they are read:
    `collection.read_geometry`, else the one training composes its rows by."""
    return cfg.collection.read_geometry or cfg.train.geometry


def stamp(cfg: PipelineConfig, **extra) -> dict:
    """What results read from cartridges trained under `cfg` depend on (`study.cached_method`),
    JSON-able: every flat setting (`FLAT`; the geometry as its spec string) but LATER_FIELDS at
    defaults, and then every other section field (by path, `DERIVED` aside) whose value differs
    from the default config's. Without `distractors` in `extra` (or with 0) every row read one
    cartridge, so a geometry that reads one cartridge as the identity (`Geometry.reshapes_one`
    False) trained and read nothing differently and is left out too: the training geometry,
    and `collection.read_geometry` (a CAS run reading serially reuses isolated results
    recorded under the default read geometry)."""
    default, out = PipelineConfig(), {}
    for name, path in FLAT.items():
        value = _get(cfg, path)
        if name in LATER_FIELDS and value == _get(default, path):
            continue
        if isinstance(value, Geometry):
            if not extra.get("distractors") and not value.reshapes_one:
                continue
            value = str(value)
        out[name] = value
    for path in _leaf_paths(cfg):
        if (path not in FLAT.values() and path not in DERIVED
                and _get(cfg, path) != _get(default, path)):
            value = _get(cfg, path)
            if isinstance(value, Geometry):
                if not extra.get("distractors") and not value.reshapes_one:
                    continue
                value = str(value)
            out[path] = value
    return {**json.loads(json.dumps(out)), **extra}


def _leaf_paths(obj, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, Geometry):
            out += _leaf_paths(value, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def collection_config(cfg: PipelineConfig, tokens_per_doc: int, distractors: int
                      ) -> CollectionConfig:
    """`cfg.collection` for cartridges of `tokens_per_doc` tokens trained with at most
    `distractors` others (0: in isolation, the uniform schedule with no quiet steps)."""
    schedule = cfg.collection.distractors
    return dataclasses.replace(cfg.collection, tokens_per_doc=tokens_per_doc,
                               distractors=DistractorSchedule(
        distractors, schedule.kind if distractors else "uniform", schedule.ramp_steps,
        p_iso=schedule.p_iso, quiet=schedule.quiet if distractors else 0.0))


def synthesize(model: LoadedModel, docs: Collection, data_dir: str, cfg: PipelineConfig,
               on_batch: Callable[[synthesis.Progress], None] | None = None) -> str:
    """Self-study conversations for every document into `data_dir` (resumed if present)."""
    study = synthesis.SelfStudy(model, docs, cfg.synthesis)
    items = synthesis.work_items(docs.ids, cfg.conversations_per_doc, cfg.seed)
    synthesis.run_shard(study, items, data_dir, batch_size=cfg.synthesis_batch,
                        on_batch=on_batch)
    return data_dir


def _train(model: LoadedModel, data_dir: str, store_dir: str, cfg: PipelineConfig, *,
           tokens_per_doc: int, distractors: int, texts: dict[str, str],
           cartridge_of: dict[str, str] | None,
           on_report: Callable[[CollectionReport], None] | None) -> tuple[CartridgeStore, dict]:
    """`train_collection` with the pipeline's collection and train sections, so CAS and both
    baselines see the same data and token budget."""
    summary = train_collection(model, data_dir, store_dir,
                               collection_config(cfg, tokens_per_doc, distractors), cfg.train,
                               texts=texts,
                               cartridge_of=cartridge_of, on_report=on_report)
    return CartridgeStore(os.path.join(store_dir, "cartridges"), model.fingerprint), summary


def train_cartridges(model: LoadedModel, docs: Collection, data_dir: str, store_dir: str,
                     cfg: PipelineConfig, *, distractors: int | None = None,
                     tokens_per_doc: int | None = None,
                     on_report: Callable[[CollectionReport], None] | None = None
                     ) -> tuple[CartridgeStore, dict]:
    """CAS training of one cartridge per document (distractors=0: trained in isolation)."""
    if distractors is None:
        distractors = cfg.collection.distractors.k_max
    return _train(model, data_dir, store_dir, cfg,
                  tokens_per_doc=tokens_per_doc or cfg.collection.tokens_per_doc,
                  distractors=distractors,
                  texts=docs.texts, cartridge_of=None, on_report=on_report)


def initial_store(model: LoadedModel, docs: Collection, store_dir: str, cfg: PipelineConfig
                  ) -> CartridgeStore:
    """The store `train_cartridges` starts from: every document's first-P-token cartridge with
    fresh optimizer state (created where missing), i.e. the cartridges at step 0."""
    store = CartridgeStore(os.path.join(store_dir, "cartridges"), model.fingerprint)
    initialise_store(store, model, docs.texts, cfg.collection.tokens_per_doc,
                     train.make_optimizer(cfg.train), init=cfg.collection.init,
                     geometry=str(cfg.train.geometry))
    return store


MONOLITHIC_ID = "monolithic"


def monolithic_inputs(model: LoadedModel, docs: Collection, tokens_per_doc: int, seq_len: int
                      ) -> tuple[dict[str, str], dict[str, str], int]:
    """What `train_collection` needs to train the monolithic baseline: (texts, cartridge_of,
    cartridge tokens). Its one cartridge (`MONOLITHIC_ID`) has len(docs) x tokens_per_doc
    tokens, initialised from every document's first `tokens_per_doc` tokens in collection
    order (so no document is left out of the start); every document's conversations train it.
    Raises ValueError if the cartridge and a sequence do not fit the model's window."""
    n = len(docs) * tokens_per_doc
    if n + seq_len > model.config.max_position_embeddings:
        raise ValueError(f"monolithic cartridge: {len(docs)} documents x {tokens_per_doc} "
                         f"tokens + seq_len {seq_len} exceed the model window "
                         f"{model.config.max_position_embeddings}; use fewer documents or "
                         "a smaller tokens_per_doc")
    text = "\n\n".join(model.tokenizer.decode(document_tokens(model.tokenizer, docs[d].text,
                                                               tokens_per_doc).tolist())
                        for d in docs.ids)
    return {MONOLITHIC_ID: text}, {d: MONOLITHIC_ID for d in docs.ids}, n


def train_monolithic(model: LoadedModel, docs: Collection, data_dir: str, store_dir: str,
                     cfg: PipelineConfig,
                     on_report: Callable[[CollectionReport], None] | None = None
                     ) -> tuple[CartridgeStore, dict]:
    """The monolithic baseline: ONE cartridge of n_docs x P tokens (the same total as the
    per-document cartridges) trained on every document's conversations, with the same steps,
    batch and learning rate, so the same data and token budget. Stored as `MONOLITHIC_ID`."""
    texts, cartridge_of, n = monolithic_inputs(model, docs, cfg.collection.tokens_per_doc,
                                               cfg.collection.seq_len)
    return _train(model, data_dir, store_dir, cfg, tokens_per_doc=n, distractors=0,
                  texts=texts, cartridge_of=cartridge_of, on_report=on_report)


def evaluate_monolithic(ev: evaluate.Evaluator, questions: Sequence[Question], source,
                        name: str = "monolithic_cartridge") -> EvalResult:
    """Every question reads the one monolithic cartridge."""
    return ev.cartridges(questions, source, lambda q: [MONOLITHIC_ID], name, slots=1)


class StoreSource:
    """The cartridges of a CartridgeStore by document id (an `evaluate.CartridgeSource`)."""

    def __init__(self, store: CartridgeStore):
        self.store = store

    def get(self, doc_id: str):
        return self.store.load_cartridge(doc_id) if self.store.exists(doc_id) else None


def _each(runs: Sequence[Callable[[], EvalResult]],
          on_result: Callable[[EvalResult], None] | None) -> list[EvalResult]:
    results = []
    for run in runs:
        results.append(run())
        if on_result is not None:
            on_result(results[-1])
    return results


def evaluate_baselines(ev: evaluate.Evaluator, questions: Sequence[Question], top_k: int,
                       on_result: Callable[[EvalResult], None] | None = None
                       ) -> list[EvalResult]:
    """The methods that need no cartridge: closed book, ICL, RAG (BM25); `on_result` is
    called after each."""
    return _each([lambda: ev.closed_book(questions), lambda: ev.icl(questions),
                  lambda: ev.rag(questions, top_k=top_k)], on_result)


def evaluate_cartridges(ev: evaluate.Evaluator, questions: Sequence[Question], source,
                        label: str, top_k: int, compose_k: int = 0, seed: int = 0,
                        on_result: Callable[[EvalResult], None] | None = None
                        ) -> list[EvalResult]:
    """Oracle, composed (each question's cartridge with `compose_k` others,
    `distractors.composed_sets`; left out at 0) and BM25-retrieved cartridges of one
    cartridge source, named after `label`."""
    runs = [lambda: ev.oracle_cartridge(questions, source, name=f"oracle_cartridge_{label}")]
    if compose_k:
        ids = ev.collection.ids
        sets = dict(zip(map(id, questions), composed_sets(questions, ids, compose_k, seed)))
        runs.append(lambda: ev.cartridges(questions, source, lambda q: sets[id(q)],
                                          f"composed_cartridges_{label}_k{compose_k}",
                                          slots=compose_k + 1, capacity=len(ids)))
    runs.append(lambda: ev.retrieval_cartridges(questions, source, top_k=top_k,
                                                name=f"retrieval_cartridges_{label}_k{top_k}"))
    return _each(runs, on_result)
