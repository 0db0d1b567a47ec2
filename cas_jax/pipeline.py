"""The end-to-end stages shared by `experiments.pipeline` and the quality study
(`cas_jax.study`, `benchmarks.quality`): self-study synthesis of a collection, CAS training of
its cartridges, and evaluation.

Each stage resumes from what is already complete in its output folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

from cas_jax import evaluate, synthesis, train
from cas_jax.corpus import Collection
from cas_jax.attention import DEFAULT_GEOMETRY, Geometry
from cas_jax.distractors import DistractorSchedule, composed_sets
from cas_jax.loading import LoadedModel
from cas_jax.questions import Question
from cas_jax.results import EvalResult
from cas_jax.store import CartridgeStore
from cas_jax.train_collection import (CollectionConfig, CollectionReport, document_tokens,
                                     initialise_store, train_collection)


SPANS_ONLY = tuple(float(f == synthesis.SPANS) for f in synthesis.FAMILIES)
"""Family weights (`synthesis.FAMILIES` order) that synthesise span conversations only."""


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Sizes of every stage; defaults are the 2-core CPU demo and the recipe of BUILD_NOTES.md
    ("Cartridges that work"): span conversations only (the 135M model's generated answers
    carry little of the document), whole short documents as chunks, P=64."""

    conversations_per_doc: int = 24
    chunk_min: int = 1024
    chunk_max: int = 1024
    max_user_tokens: int = 48
    max_answer_tokens: int = 96
    synthesis_batch: int = 16
    tokens_per_doc: int = 64
    distractors: int = 2
    steps: int = 48
    batch: int = 4
    seq_len: int = 320
    lr: float = 2e-2
    budget_bytes: int = 1 << 30
    top_k: int = 2
    seed: int = 0
    family_weights: tuple[float, ...] | None = SPANS_ONLY
    span_turns: int = 4
    no_repeat_ngram_size: int = 4
    repetition_penalty: float = 1.0
    init: str = "first_tokens"  # train_collection.INITS
    distractor_schedule: str = "uniform"  # distractors.SCHEDULES
    ramp_steps: int = 100
    grad_scope: str = "target"  # train_collection.GRAD_SCOPES
    p_iso: float = 0.0  # the mixed schedule's share of isolated rows
    quiet: float = 0.0  # share of quiet steps (distractors module doc)
    geometry: Geometry = DEFAULT_GEOMETRY  # how composed cartridges stand (attention.Geometry)


LATER_FIELDS = ("p_iso", "quiet", "geometry")
"""PipelineConfig fields added after results were recorded: `stamp` leaves them out while they
hold their defaults, so the recorded results still match the configs that made them."""


def stamp(cfg: PipelineConfig, **extra) -> dict:
    """What results read from cartridges trained under `cfg` depend on (`study.cached_method`),
    JSON-able: every field (the geometry as its spec string) but LATER_FIELDS at defaults.
    Without `distractors` in `extra` (or with 0) every row read one cartridge, so a geometry
    that reads one cartridge as the identity does (`Geometry.reshapes_one` False) trained
    nothing differently and is left out too."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in LATER_FIELDS and value == f.default:
            continue
        if isinstance(value, Geometry):
            if not extra.get("distractors") and not value.reshapes_one:
                continue
            value = str(value)
        out[f.name] = value
    return {**json.loads(json.dumps(out)), **extra}


def synthesize(model: LoadedModel, docs: Collection, data_dir: str, cfg: PipelineConfig,
               on_batch: Callable[[synthesis.Progress], None] | None = None) -> str:
    """Self-study conversations for every document into `data_dir` (resumed if present)."""
    study = synthesis.SelfStudy(model, docs, synthesis.SynthesisConfig(
        chunk_min=cfg.chunk_min, chunk_max=cfg.chunk_max, max_user_tokens=cfg.max_user_tokens,
        max_answer_tokens=cfg.max_answer_tokens, family_weights=cfg.family_weights,
        span_turns=cfg.span_turns, no_repeat_ngram_size=cfg.no_repeat_ngram_size,
        repetition_penalty=cfg.repetition_penalty))
    items = synthesis.work_items(docs.ids, cfg.conversations_per_doc, cfg.seed)
    synthesis.run_shard(study, items, data_dir, batch_size=cfg.synthesis_batch,
                        on_batch=on_batch)
    return data_dir


def _train(model: LoadedModel, data_dir: str, store_dir: str, cfg: PipelineConfig, *,
           tokens_per_doc: int, distractors: int, texts: dict[str, str],
           cartridge_of: dict[str, str] | None,
           on_report: Callable[[CollectionReport], None] | None) -> tuple[CartridgeStore, dict]:
    """`train_collection` with the pipeline's steps, batch, budget, learning rate and seed, so
    CAS and both baselines see the same data and token budget."""
    ccfg = CollectionConfig(
        tokens_per_doc=tokens_per_doc, init=cfg.init, batch_size=cfg.batch, seq_len=cfg.seq_len,
        steps=cfg.steps, distractors=DistractorSchedule(
            distractors, cfg.distractor_schedule if distractors else "uniform", cfg.ramp_steps,
            p_iso=cfg.p_iso, quiet=cfg.quiet if distractors else 0.0),
        grad_scope=cfg.grad_scope, budget_bytes=cfg.budget_bytes,
        checkpoint_every=max(cfg.steps // 4, 1), seed=cfg.seed)
    tcfg = train.TrainConfig(lr=cfg.lr, total_steps=cfg.steps, geometry=cfg.geometry)
    summary = train_collection(model, data_dir, store_dir, ccfg, tcfg, texts=texts,
                               cartridge_of=cartridge_of, on_report=on_report)
    return CartridgeStore(os.path.join(store_dir, "cartridges"), model.fingerprint), summary


def train_cartridges(model: LoadedModel, docs: Collection, data_dir: str, store_dir: str,
                     cfg: PipelineConfig, *, distractors: int | None = None,
                     tokens_per_doc: int | None = None,
                     on_report: Callable[[CollectionReport], None] | None = None
                     ) -> tuple[CartridgeStore, dict]:
    """CAS training of one cartridge per document (distractors=0: trained in isolation)."""
    return _train(model, data_dir, store_dir, cfg,
                  tokens_per_doc=tokens_per_doc or cfg.tokens_per_doc,
                  distractors=cfg.distractors if distractors is None else distractors,
                  texts=docs.texts, cartridge_of=None, on_report=on_report)


def initial_store(model: LoadedModel, docs: Collection, store_dir: str, cfg: PipelineConfig
                  ) -> CartridgeStore:
    """The store `train_cartridges` starts from: every document's first-P-token cartridge with
    fresh optimizer state (created where missing), i.e. the cartridges at step 0."""
    store = CartridgeStore(os.path.join(store_dir, "cartridges"), model.fingerprint)
    optimizer = train.make_optimizer(train.TrainConfig(lr=cfg.lr, total_steps=cfg.steps))
    initialise_store(store, model, docs.texts, cfg.tokens_per_doc, optimizer, init=cfg.init,
                     geometry=str(cfg.geometry))
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
    texts, cartridge_of, n = monolithic_inputs(model, docs, cfg.tokens_per_doc, cfg.seq_len)
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
