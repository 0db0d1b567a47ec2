"""Evaluation of a question file under context methods: closed book, ICL, RAG and cartridges.

Every method answers the same questions with the same query tokens
(`cas_jax.evaluation.prompts.build_prompt`); methods differ only in what comes before the query:

  closed_book           nothing
  icl                   the question's document as the document block (`cas_jax.model.rendering`) at
                        the start of the sequence, cut to the token budget (window minus room
                        for the query and answer)
  rag                   the top-k retrieved chunks (of `chunk_tokens` tokens, over all documents)
  oracle_cartridge      the question's document's cartridge, as the attention prefix
  retrieval_cartridges  the top-k retrieved documents' cartridges, composed (`attention.compose`)
  cartridges            any cartridge source and selection rule (e.g. one monolithic cartridge)

ICL and RAG context is prefilled once per distinct context (a document, a retrieved chunk set)
and enters the forward as a prefix of its exact K/V, which is the same computation as placing
its tokens at the start of the sequence (tested); queries start at position = visible prefix
tokens, as with cartridges. Its prefill time counts in the method's time.

Multiple choice on a small model: by default the question is asked alone and each option is
scored as the assistant's reply (cloze). `EvalConfig.list_options` instead lists the options
("A. Paris" lines, then `prompts.MC_INSTRUCTION`). SmolLM2-135M-Instruct answers listed options
mostly by position ("A. ..."): on 16 Factbook questions (ICL cut to 2,048 tokens) listed scored 0.25
(closed book) and 0.19 (ICL), chance level, against 0.56 and 0.50 cloze; on 5 facts found only
in a short made-up document, ICL vs closed book was 3/5 vs 2/5 listed and 5/5 vs 0/5 cloze.
The option score is the mean log-probability per option token: summing favours short options
and scored 2/5 (cloze ICL) and 0/5 (listed ICL) on those 5 facts, against 5/5 and 3/5 for the
mean.

Metrics (per method, over its questions):
  accuracy_ll     multiple choice: the option with the highest score (`option_score`: "mean"
                  log-prob per option token, the default, or "sum") as the reply
  accuracy_gen    multiple choice: greedy generation parsed by `prompts.parse_choice` (a letter, or
                  the option text appearing in the reply)
  free_match      free answer: the normalised gold text appears in the greedy generation
  gold_nll        mean over questions of the per-token NLL (nats) of the gold answer text
  prompt_tokens   mean tokens of the prompt: context (ICL/RAG) plus query
  context_tokens  mean tokens of context in the prompt (0 for closed book and cartridges)
  cartridge_tokens mean visible cartridge tokens in the prefix (0 without cartridges)
  kv_bytes        mean (prompt + cartridge tokens) * `ModelConfig.kv_bytes_per_token`: the K/V a
                  question needs resident (bf16 convention)
  seconds         wall time of retrieval, getting the prefix ready (context prefill, or reading
                  cartridges from their source), scoring and generation, without the time JAX
                  spent tracing and compiling (reported as compile_s / compilations); index
                  building (BM25, dense embeddings of the collection) is not counted

The batched forwards (scoring, generation, context prefill) are in `scoring`; prompts and
answer parsing in `prompts`; `EvalResult` and its tables in `results` (all in
`cas_jax.evaluation`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from cas_jax.cartridges import attention
from cas_jax.cartridges.cartridge import Cartridge, check_compatible
from cas_jax.documents import retrieval
from cas_jax.documents.corpus import Collection
from cas_jax.evaluation import prompts, results
from cas_jax.evaluation.lookup import CollectionIndex
from cas_jax.evaluation.questions import Question
from cas_jax.evaluation.results import EvalResult
from cas_jax.evaluation.scoring import generate_answers, prefill_contexts, score_continuations
from cas_jax.model import rendering, sampling
from cas_jax.model.loading import LoadedModel

OPTION_SCORES = ("mean", "sum")
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


class CartridgeSource(Protocol):
    """Where cartridges come from: a dict, or an adapter over a CartridgeStore."""

    def get(self, doc_id: str) -> Cartridge | None: ...


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings.

    window: tokens a question may use (context + query + answer); None = the model's window.
    max_new_tokens: greedy generation length; 0 skips generation (no accuracy_gen/free_match).
    option_score: "mean" or "sum" log-probability of an option's tokens (see module doc).
    list_options: list multiple-choice options ("A. ...") in the question, or ask the question
      alone and score each option as the reply (cloze, the default; see module doc).
    rows_per_call: rows per jitted forward (a power of two keeps shapes few).
    prefix_tokens_per_call: cap on rows x prefix slots per forward (bounds prefix memory).
    prefill_chunk: context tokens prefilled per step.
    chunk_tokens: RAG chunk length in tokens.
    format: the document block's format (`cas_jax.model.rendering.FORMATS`); cartridges must have
      been trained under the same one.
    geometry: how composed cartridges stand before the question (`attention.Geometry`); it
      should be the one they were trained under. ICL and RAG contexts are read as they are.
    retrieval_cache: a folder keeping dense retrievers' embeddings (`retrieval.DenseRetriever`)
      between runs; "" keeps none.
    router: the retriever ("bm25" or "dense") whose scores of the question against the
      composed documents give a geometry's relevance routing (`attention.Geometry.relevance`).
    """

    window: int | None = None
    max_new_tokens: int = 24
    option_score: str = "mean"
    list_options: bool = False
    rows_per_call: int = 16
    prefix_tokens_per_call: int = 32768
    prefill_chunk: int = 512
    chunk_tokens: int = 256
    format: str = rendering.DEFAULT_FORMAT
    geometry: attention.Geometry = attention.DEFAULT_GEOMETRY
    retrieval_cache: str = ""
    router: str = "bm25"

    def __post_init__(self):
        if self.format not in rendering.FORMATS:
            raise ValueError(f"format must be one of {rendering.FORMATS}, got {self.format!r}")
        if self.router not in retrieval.RETRIEVER_KINDS:
            raise ValueError(f"router must be one of {retrieval.RETRIEVER_KINDS}, "
                             f"got {self.router!r}")
        if self.option_score not in OPTION_SCORES:
            raise ValueError(f"option_score must be one of {OPTION_SCORES}, "
                             f"got {self.option_score!r}")


class _CompileClock:
    """Wall time of a block minus the time JAX spent tracing, lowering and compiling in it."""

    def __enter__(self):
        self.compile_s, self.compilations = 0.0, 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        self._t0 = time.perf_counter()
        return self

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if event in _COMPILE_EVENTS:
            self.compile_s += duration
            self.compilations += event == _COMPILE_EVENTS[-1]

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self._t0
        jax.monitoring.unregister_event_duration_listener(self._listen)

    @property
    def seconds(self) -> float:
        return max(self.wall_s - self.compile_s, 0.0)



@dataclasses.dataclass(frozen=True)
class _Context:
    """One question's context under ICL or RAG: the prefilled turn `key` with its tokens."""

    key: str
    tokens: list[int]
    truncated_tokens: int
    retrieved: list[str] | None = None
    hit: bool | None = None


# ----------------------------------------------------------------------------- evaluator


class Evaluator:
    """Runs the methods on questions about `collection` with one model.

    Retrievers, RAG chunks and routing scores (`self.index`, a `lookup.CollectionIndex`) are
    built on first use and kept; prefilled contexts are not
    (each method run prefills its own, in groups of at most `prefix_tokens_per_call` tokens).
    """

    def __init__(self, model: LoadedModel, collection: Collection,
                 config: EvalConfig = EvalConfig()):
        self.model = model
        self.collection = collection
        self.config = config
        self.window = config.window or model.config.max_position_embeddings
        if self.window > model.config.max_position_embeddings:
            raise ValueError(f"window {self.window} exceeds the model's "
                             f"{model.config.max_position_embeddings} positions")
        self.index = CollectionIndex(collection, model.tokenizer, config.chunk_tokens,
                                     config.retrieval_cache or None)

    # -- methods

    def closed_book(self, questions: Sequence[Question]) -> EvalResult:
        """No context: the query alone."""
        with _CompileClock() as clock:
            records = self._records(questions, [[] for _ in questions], {}, 1)
            for r in records:
                r.update(context_tokens=0, cartridge_tokens=0, truncated_tokens=0)
        return self._result("closed_book", records, clock)

    def icl(self, questions: Sequence[Question]) -> EvalResult:
        """The question's document as context, cut to `context_budget(questions)` tokens."""
        missing = sorted({q.doc_id for q in questions} - set(self.collection.ids))
        if missing:
            raise KeyError(f"questions about documents {missing} not in the collection")
        with _CompileClock() as clock:
            budget = self.context_budget(questions)
            fitted = {}
            for doc_id in dict.fromkeys(q.doc_id for q in questions):
                doc = self.collection[doc_id]
                fitted[doc_id] = prompts.fit_context(self.model.tokenizer, [(doc.title, doc.text)],
                                             budget, self.config.format)
            contexts = [_Context(q.doc_id, *fitted[q.doc_id]) for q in questions]
            records = self._context_records(questions, contexts, budget)
        return self._result("icl", records, clock)

    def rag(self, questions: Sequence[Question], top_k: int = 3, retriever: str = "bm25"
            ) -> EvalResult:
        """The top_k chunks (`chunk_tokens` each, over all documents) retrieved for the question
        text, best first, as context; trailing chunks are dropped if over the budget."""
        chunks = self.index.chunks()
        index = self.index.retriever(retriever, "chunks")
        with _CompileClock() as clock:
            budget = self.context_budget(questions)
            contexts = []
            for q in questions:
                ids = [i for i, _ in index.search(q.question, top_k)]
                block, dropped = prompts.fit_context(self.model.tokenizer, [chunks[i] for i in ids],
                                             budget, self.config.format)
                hit = any(i.rsplit("#", 1)[0] == q.doc_id for i in ids)
                contexts.append(_Context("|".join(ids), block, dropped, ids, hit))
            records = self._context_records(questions, contexts, budget)
        return self._result(f"rag_{retriever}_k{top_k}", records, clock)

    def cartridges(self, questions: Sequence[Question], source: CartridgeSource,
                   select: Callable[[Question], Sequence[str]], name: str = "cartridges",
                   slots: int | None = None, capacity: int | None = None) -> EvalResult:
        """The cartridges `select(question)` (ids into `source`, best first) composed as prefix.

        slots: composition slots per row (default: the most any question selects).
        capacity: bank slots (default: the number of distinct selected cartridges); a fixed
          capacity keeps shapes, so another selection does not recompile (as long as its longest
          cartridge is as long). Only selected cartridges are read.
        A monolithic baseline is `select=lambda q: ["all"]` with `source={"all": cartridge}`.
        """
        with _CompileClock() as clock:
            entries = [list(select(q)) for q in questions]
            records = self._cartridge_records(questions, source, entries, slots, capacity)
        return self._result(name, records, clock)

    def oracle_cartridge(self, questions: Sequence[Question], source: CartridgeSource,
                         name: str = "oracle_cartridge") -> EvalResult:
        """The question's own document's cartridge."""
        return self.cartridges(questions, source, lambda q: [q.doc_id], name, slots=1)

    def retrieval_cartridges(self, questions: Sequence[Question], source: CartridgeSource,
                             top_k: int = 3, retriever: str = "bm25", slots: int | None = None,
                             name: str | None = None) -> EvalResult:
        """The top_k documents retrieved for the question text, their cartridges composed.

        The bank has a slot for every document of the collection and each row `slots`
        (default top_k) composition slots, so changing top_k up to `slots` does not recompile
        (with cartridges of one length, as CAS trains them).
        """
        slots = slots or top_k
        if top_k > slots:
            raise ValueError(f"top_k {top_k} exceeds the {slots} composition slots")
        index = self.index.retriever(retriever, "docs")
        with _CompileClock() as clock:
            # Searching `slots` deep for every top_k keeps the retriever's shapes fixed too.
            entries = [[i for i, _ in index.search(q.question, slots)][:top_k] for q in questions]
            records = self._cartridge_records(questions, source, entries, slots,
                                              len(self.collection))
            for r, q, e in zip(records, questions, entries):
                r.update(retrieved=e, retrieval_hit=q.doc_id in e)
        return self._result(name or f"retrieval_cartridges_{retriever}_k{top_k}", records, clock)

    # -- shared machinery

    def _room(self, questions: Sequence[Question]) -> int:
        """Tokens the longest query needs with its answer: the longest option or gold answer,
        and (with generation) the bucketed prompt plus the bucketed new tokens."""
        tok, room = self.model.tokenizer, 0
        for q in questions:
            query = self._query(q)
            answers = q.options if q.options is not None else (q.gold,)
            room = max(room, len(query) + max(len(tok.encode(a, add_special_tokens=False))
                                              for a in answers))
            if self.config.max_new_tokens:
                room = max(room, sampling.bucket(len(query))
                           + sampling.bucket(self.config.max_new_tokens))
        return room

    def context_budget(self, questions: Sequence[Question]) -> int:
        """Context tokens (ICL, RAG) allowed per question: the window minus `_room`, rounded
        down to a multiple of 64."""
        room = self._room(questions)
        budget = (self.window - room) // 64 * 64
        if budget < 64:
            raise ValueError(f"window {self.window} leaves no room for context after the "
                             f"{room} tokens the queries and answers need")
        return budget

    def _query(self, q: Question) -> list[int]:
        return prompts.build_prompt(self.model.tokenizer, q, list_options=self.config.list_options,
                            format=self.config.format).query

    def _result(self, method: str, records: list[dict[str, Any]], clock: _CompileClock
                ) -> EvalResult:
        for r in records:
            r["prompt_tokens"] = r["query_tokens"] + r["context_tokens"]
            r.setdefault("retrieved", None)
            r.setdefault("retrieval_hit", None)
        return dataclasses.replace(
            results.summarise(method, records, self.model.config.kv_bytes_per_token),
            seconds=clock.seconds, compile_s=clock.compile_s, compilations=clock.compilations)

    def _load(self, source: CartridgeSource, doc_id: str) -> Cartridge:
        cartridge = source.get(doc_id)
        if cartridge is None:
            raise KeyError(f"no cartridge for {doc_id!r} in the cartridge source")
        cfg = self.model.config
        check_compatible(cartridge, self.model.fingerprint, cfg.num_layers, cfg.num_kv_heads,
                         cfg.head_dim, name=f"cartridge {doc_id!r}")
        return cartridge

    def _cartridge_records(self, questions: Sequence[Question], source: CartridgeSource,
                           entries: list[list[str]], slots: int | None,
                           capacity: int | None) -> list[dict[str, Any]]:
        """Records for questions whose prefix composes the cartridges `entries[i]`."""
        bank = {i: self._load(source, i) for i in sorted({i for e in entries for i in e})}
        slots = slots or max(len(e) for e in entries)
        max_tokens = max(c.num_tokens for c in bank.values())
        room = self._room(questions)
        if slots * max_tokens + room > self.window:
            raise ValueError(f"{slots} slots of {max_tokens} cartridge tokens plus {room} for "
                             f"the queries exceed the window {self.window}")
        geometry = self.config.geometry
        biases = self.relevance_biases(questions, entries) if geometry.relevance > 0 else None
        records = self._records(questions, entries, bank, slots, capacity, geometry=geometry,
                                biases=biases)
        for r, e in zip(records, entries):
            lengths = [bank[i].num_tokens for i in e]
            # composition shows one attention sink: later cartridges' token 0 is masked
            r.update(context_tokens=0, truncated_tokens=0,
                     cartridge_tokens=sum(lengths) - max(len(lengths) - 1, 0))
        return records

    def relevance_biases(self, questions: Sequence[Question], entries: list[list[str]]
                         ) -> list[list[float]]:
        """Per question, its composed documents' logit biases under the geometry's relevance
        (`lookup.CollectionIndex.relevance_biases`, scored by `EvalConfig.router`)."""
        g = self.config.geometry
        return self.index.relevance_biases(g.relevance, self.config.router, questions, entries,
                                           g.relevance_floor)

    def _context_records(self, questions: Sequence[Question], contexts: list[_Context],
                         budget: int) -> list[dict[str, Any]]:
        """Records for questions whose prefix is their context's exact K/V.

        Questions go in groups whose distinct contexts total at most `prefix_tokens_per_call`
        tokens (at least one context): each group's contexts are prefilled, used, and freed.
        """
        cfg = self.config
        order = sorted(range(len(questions)), key=lambda i: contexts[i].key)
        groups, group, size, keys = [], [], 0, set()
        for i in order:
            c = contexts[i]
            if c.key not in keys and group and size + len(c.tokens) > cfg.prefix_tokens_per_call:
                groups.append(group)
                group, size, keys = [], 0, set()
            if c.key not in keys:
                keys.add(c.key)
                size += len(c.tokens)
            group.append(i)
        groups.append(group)
        records: list[dict[str, Any] | None] = [None] * len(questions)
        for group in groups:
            blocks = {contexts[i].key: contexts[i].tokens for i in group}
            names = list(blocks)
            prefilled = prefill_contexts(self.model, [blocks[k] for k in names], names,
                                         cfg.prefill_chunk, cfg.prefix_tokens_per_call,
                                         cfg.rows_per_call)
            # Padded shapes (tokens to a multiple of 64, within the budget; slots to a power of
            # two) keep recompilation rare from one group to the next.
            max_tokens = min(-(-max(len(b) for b in blocks.values()) // 64) * 64, budget)
            rows = self._records([questions[i] for i in group], [[contexts[i].key] for i in group],
                                 dict(zip(names, prefilled)), 1,
                                 sampling.bucket(len(names), minimum=1), max_tokens)
            for i, r in zip(group, rows):
                c = contexts[i]
                r.update(context_tokens=len(c.tokens), cartridge_tokens=0,
                         truncated_tokens=c.truncated_tokens, retrieved=c.retrieved,
                         retrieval_hit=c.hit)
                records[i] = r
        return records

    def _records(self, questions: Sequence[Question], entries: list[list[str]],
                 cartridges: dict[str, Cartridge], slots: int, capacity: int | None = None,
                 max_tokens: int | None = None,
                 geometry: attention.Geometry = attention.SERIAL,
                 biases: list[list[float]] | None = None) -> list[dict[str, Any]]:
        """Scores every option (or the gold answer) and generates a reply for each question,
        with prefix = cartridges[entries[i]] composed in order by `geometry` (serial for a
        prefilled context, which stands exactly where the document did); one record each.

        The bank holds `cartridges` in order, in `capacity` slots (default: one each) of
        `max_tokens` tokens (default: the longest cartridge).
        """
        if not questions:
            raise ValueError("no questions to evaluate")
        cfg, tok = self.config, self.model.tokenizer
        bank = (attention.bank_from_cartridges(list(cartridges.values()), capacity, max_tokens)
                if cartridges else None)
        slot_of = {k: i for i, k in enumerate(cartridges)}
        selections = [[slot_of[k] for k in e] for e in entries]
        queries = [self._query(q) for q in questions]

        owner, conts = [], []
        for qi, q in enumerate(questions):
            for a in (q.options if q.options is not None else (q.gold,)):
                ids = tok.encode(a, add_special_tokens=False)
                if not ids:
                    raise ValueError(f"question {q.question!r}: answer {a!r} has no tokens")
                owner.append(qi)
                conts.append(ids)
        kw = dict(bank=bank, slots=slots, rows_per_call=cfg.rows_per_call,
                  prefix_tokens_per_call=cfg.prefix_tokens_per_call, geometry=geometry)
        scored = score_continuations(
            self.model, [queries[i] for i in owner], conts,
            selections=[selections[i] for i in owner],
            biases=None if biases is None else [biases[i] for i in owner], **kw)
        generated = (generate_answers(self.model, queries, cfg.max_new_tokens,
                                      selections=selections, biases=biases, **kw)
                     if cfg.max_new_tokens else [None] * len(questions))

        records, row = [], 0
        for qi, q in enumerate(questions):
            n = 1 if q.options is None else len(q.options)
            lps = scored[row:row + n]
            row += n
            gold_lp = lps[0] if q.options is None else lps[q.answer]
            rec: dict[str, Any] = dict(doc_id=q.doc_id, question=q.question, kind=q.kind,
                                       gold=q.gold, query_tokens=len(queries[qi]),
                                       gold_nll=float(-gold_lp.mean()), generation=generated[qi])
            if q.options is not None:
                sums = [float(lp.sum()) for lp in lps]
                counts = [len(lp) for lp in lps]
                scores = sums if cfg.option_score == "sum" else np.divide(sums, counts)
                rec.update(answer=q.answer, option_logprobs=sums, option_tokens=counts,
                           prediction_ll=int(np.argmax(scores)))
                rec["correct_ll"] = rec["prediction_ll"] == q.answer
                if generated[qi] is not None:
                    rec["prediction_gen"] = prompts.parse_choice(generated[qi], q.options)
                    rec["correct_gen"] = rec["prediction_gen"] == q.answer
            elif generated[qi] is not None:
                rec["correct_gen"] = prompts.answer_matches(generated[qi], q.gold)
            records.append(rec)
        return records
