"""The end-to-end stages shared by `experiments.pipeline` and `benchmarks.compression_sweep`:
self-study synthesis of a collection, CAS training of its cartridges, and evaluation.

Each stage resumes from what is already complete in its output folder.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

from cas_jax import evaluate, synthesis, train
from cas_jax.corpus import Collection
from cas_jax.distractors import DistractorSchedule
from cas_jax.loading import LoadedModel
from cas_jax.questions import Question
from cas_jax.store import CartridgeStore
from cas_jax.train_collection import CollectionConfig, CollectionReport, train_collection


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Sizes of every stage; defaults are the 2-core CPU demo."""

    conversations_per_doc: int = 8
    chunk_min: int = 256
    chunk_max: int = 384
    max_user_tokens: int = 48
    max_answer_tokens: int = 96
    synthesis_batch: int = 16
    tokens_per_doc: int = 64
    distractors: int = 2
    steps: int = 32
    batch: int = 4
    seq_len: int = 192
    lr: float = 2e-2
    budget_bytes: int = 1 << 30
    top_k: int = 2
    seed: int = 0


def synthesize(model: LoadedModel, docs: Collection, data_dir: str, cfg: PipelineConfig,
               on_batch: Callable[[synthesis.Progress], None] | None = None) -> str:
    """Self-study conversations for every document into `data_dir` (resumed if present)."""
    study = synthesis.SelfStudy(model, docs, synthesis.SynthesisConfig(
        chunk_min=cfg.chunk_min, chunk_max=cfg.chunk_max, max_user_tokens=cfg.max_user_tokens,
        max_answer_tokens=cfg.max_answer_tokens))
    items = synthesis.work_items(docs.ids, cfg.conversations_per_doc, cfg.seed)
    synthesis.run_shard(study, items, data_dir, batch_size=cfg.synthesis_batch,
                        on_batch=on_batch)
    return data_dir


def train_cartridges(model: LoadedModel, docs: Collection, data_dir: str, store_dir: str,
                     cfg: PipelineConfig, *, distractors: int | None = None,
                     tokens_per_doc: int | None = None,
                     on_report: Callable[[CollectionReport], None] | None = None
                     ) -> tuple[CartridgeStore, dict]:
    """CAS training of one cartridge per document (distractors=0: trained in isolation)."""
    k = cfg.distractors if distractors is None else distractors
    ccfg = CollectionConfig(
        tokens_per_doc=tokens_per_doc or cfg.tokens_per_doc, batch_size=cfg.batch,
        seq_len=cfg.seq_len, steps=cfg.steps, distractors=DistractorSchedule(k, "uniform"),
        budget_bytes=cfg.budget_bytes, checkpoint_every=max(cfg.steps // 4, 1), seed=cfg.seed)
    tcfg = train.TrainConfig(lr=cfg.lr, total_steps=cfg.steps)
    summary = train_collection(model, data_dir, store_dir, ccfg, tcfg, texts=docs.texts,
                               on_report=on_report)
    return CartridgeStore(os.path.join(store_dir, "cartridges"), model.fingerprint), summary


class StoreSource:
    """The cartridges of a CartridgeStore by document id (an `evaluate.CartridgeSource`)."""

    def __init__(self, store: CartridgeStore):
        self.store = store

    def get(self, doc_id: str):
        return self.store.load_cartridge(doc_id) if self.store.exists(doc_id) else None


def evaluate_baselines(ev: evaluate.Evaluator, questions: Sequence[Question], top_k: int
                       ) -> list[evaluate.EvalResult]:
    """The methods that need no cartridge: closed book, ICL, RAG (BM25)."""
    return [ev.closed_book(questions), ev.icl(questions), ev.rag(questions, top_k=top_k)]


def evaluate_cartridges(ev: evaluate.Evaluator, questions: Sequence[Question], source,
                        label: str, top_k: int) -> list[evaluate.EvalResult]:
    """Oracle and BM25-retrieved cartridges of one cartridge source, named after `label`."""
    return [ev.oracle_cartridge(questions, source, name=f"oracle_cartridge_{label}"),
            ev.retrieval_cartridges(questions, source, top_k=top_k,
                                    name=f"retrieval_cartridges_{label}_k{top_k}")]
