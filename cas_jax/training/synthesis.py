"""Self-study: synthetic conversations about document chunks, with teacher top-k targets.

For each work item (doc_id, conversation index, seed) a chunk of `chunk_min..chunk_max` tokens
is drawn from the document (`chunking.sample_chunk`, never across documents) and a seed prompt
from one family (`SEED_PROMPTS`). Both agents read the chunk as the document block of
`cas_jax.model.rendering` (the one layout of "document, then conversation"), headed by its
document's title (`rendering.titled`):
  A reads the seed prompt and writes the user message (temperature 0.6);
  B answers it (greedy).
With `rounds > 1`, A sees the conversation with roles swapped (B's answers as user turns) and
writes the next user message. All conversations of a batch go through the batched sampler
together.

The document blocks are prefilled once per batch and their K/V are the prefix of both agents'
prompts and of the teacher's forward; the teacher's view of a conversation, its alignment with
the student's and the top-k targets are `teacher`'s. Every model call (the agents' sampler, the
prefill, the teacher) goes through the model contract (`cas_jax.Decoder`), so a `LoadedModel`
holding a researcher's own decoder synthesises too.

Determinism: an item's chunk and seed prompt depend only on its seed; sampled text depends on the
batch it is generated in, which `run_shard` fixes from (items, batch_size) alone, whatever the
number of shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from cas_jax import progress
from cas_jax.documents import chunking
from cas_jax.documents.corpus import Document
from cas_jax.model import rendering, sampling, tokenizer as tok_lib
from cas_jax.model.loading import LoadedModel
from cas_jax.training import dataset, selfstudy_data, spans, teacher

_ONLY = "Output only the message, nothing else."

SEED_PROMPTS: dict[str, tuple[str, ...]] = {
    "structuring": (
        "Ask the assistant to reorganise one part of the document excerpt into a table, a "
        f"bulleted list or key-value pairs. Say precisely which part. {_ONLY}",
        "Write a request asking for the facts in one section of the excerpt to be laid out as a "
        f"JSON object with clearly named fields. {_ONLY}",
        "Pick a group of related facts in the excerpt (numbers, dates or names) and ask for them "
        f"to be arranged as a table with labelled columns. {_ONLY}",
        "Ask for an outline of the excerpt, with headings and sub-points that follow its "
        f"structure. {_ONLY}",
    ),
    "summarization": (
        f"Ask the assistant to summarise a specific part of the excerpt in a few sentences, "
        f"naming the part. {_ONLY}",
        "Write a request for a short summary of the most important facts in the excerpt, for a "
        f"reader who has never seen it. {_ONLY}",
        "Ask for a one-paragraph summary of one topic the excerpt covers, naming the topic. "
        f"{_ONLY}",
        f"Ask the assistant to list the three to five key points of the excerpt. {_ONLY}",
    ),
    "question": (
        "Write one question about a specific fact stated in the excerpt (a name, number, date or "
        f"place) that can be answered from the excerpt alone. {_ONLY}",
        "Write a question whose answer needs two facts from different parts of the excerpt. "
        f"{_ONLY}",
        "Ask about a number or quantity given in the excerpt, with enough context that the "
        f"question is unambiguous. {_ONLY}",
        "Write a question a student of this document might ask to check their understanding. "
        f"{_ONLY}",
    ),
    "use_case": (
        "Imagine a person who needs the information in the excerpt for their work (a student, a "
        "traveller, a journalist, an analyst). Write the message they would send asking for "
        f"help with a concrete task that uses it. {_ONLY}",
        "Describe a practical decision the excerpt could help with and ask the assistant for "
        f"advice grounded in it. {_ONLY}",
        "Ask the assistant to prepare a short briefing from the excerpt for someone about to "
        f"attend a meeting on this subject. {_ONLY}",
        f"Ask how a specific fact from the excerpt could be used in a report. {_ONLY}",
    ),
    "creative": (
        f"Ask the assistant for a short poem built on specific details of the excerpt. {_ONLY}",
        "Ask for a short story or dialogue whose characters mention facts from the excerpt. "
        f"{_ONLY}",
        f"Ask the assistant to explain part of the excerpt to a ten-year-old with an analogy. "
        f"{_ONLY}",
        f"Ask for a few quiz questions with their answers, based on the excerpt. {_ONLY}",
    ),
    "generic": (
        "Write a message to an assistant who has read the excerpt, asking it something about "
        f"the document. {_ONLY}",
        f"Start a conversation about the excerpt with a message it can answer. {_ONLY}",
        f"Ask the assistant for some information contained in the excerpt. {_ONLY}",
    ),
}
SPANS = "spans"
FAMILIES = tuple(SEED_PROMPTS) + (SPANS,)
"""Seed families, then `SPANS`: conversations built from the chunk's own text (`spans`), with no
generation."""


@dataclasses.dataclass(frozen=True)
class SynthesisConfig:
    """Self-study settings (defaults follow the Cartridges reference).

    family_weights: sampling weight per seed family, in `FAMILIES` order; None = uniform.
    teacher_batch_size: rows per teacher forward (bounds its memory).
    format: the document block's format (`cas_jax.model.rendering.FORMATS`).
    span_turns: (cue, segment) exchanges per `SPANS` conversation.
    no_repeat_ngram_size, repetition_penalty: both agents' repetition control
      (`sampling.SamplingParams`; counted over generated tokens only, so quoting the chunk is
      not penalised); 0 and 1.0 turn them off.
    """

    chunk_min: int = 512
    chunk_max: int = 1024
    max_user_tokens: int = 512
    max_answer_tokens: int = 1024
    user_temperature: float = 0.6
    answer_temperature: float = 0.0
    rounds: int = 1
    topk: int = 20
    family_weights: tuple[float, ...] | None = None
    teacher_batch_size: int = 8
    format: str = rendering.DEFAULT_FORMAT
    span_turns: int = 4
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0

    def penalties(self) -> dict:
        """The agents' repetition settings as `SamplingParams` fields (neutral ones left out)."""
        out = {}
        if self.no_repeat_ngram_size:
            out["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        if self.repetition_penalty != 1.0:
            out["repetition_penalty"] = self.repetition_penalty
        return out

    def family_probs(self) -> np.ndarray:
        w = np.ones(len(FAMILIES)) if self.family_weights is None else np.asarray(
            self.family_weights, np.float64)
        if w.shape != (len(FAMILIES),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"family_weights must be {len(FAMILIES)} non-negative weights for "
                             f"{FAMILIES}, got {self.family_weights}")
        return w / w.sum()


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One conversation to synthesise; `seed` fixes its chunk and seed prompt."""

    doc_id: str
    conversation_index: int
    seed: int


def work_items(doc_ids: Sequence[str], conversations_per_doc: int, seed: int) -> list[WorkItem]:
    """The deterministic work list: every (doc, conversation index), docs in the order given."""
    items = []
    for doc_id in doc_ids:
        doc_key = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "little")
        for i in range(conversations_per_doc):
            state = np.random.SeedSequence([seed, doc_key, i]).generate_state(1)[0]
            items.append(WorkItem(doc_id, i, int(state)))
    return items


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:16]


def _batch_seed(items: Sequence[WorkItem], *salt: int) -> int:
    return int(np.random.SeedSequence([*(it.seed for it in items), *salt]
                                      ).generate_state(1)[0] & 0x7FFFFFFF)


@dataclasses.dataclass
class Plan:
    """A conversation in the making: its chunk, seed prompt and the turns written so far.

    span: the chunk's token span [start, end) in the document; passage: the text of the
    agents' (and teacher's) document block; conversation: [{"role", "content"}]
    user/assistant turns.
    """

    item: WorkItem
    span: tuple[int, int]
    family: str
    seed_prompt: str
    passage: str
    conversation: list[dict[str, str]]


class SelfStudy:
    """Synthesises batches of self-study conversations for the documents of a collection."""

    def __init__(self, model: LoadedModel, documents: Mapping[str, Document],
                 config: SynthesisConfig = SynthesisConfig()):
        self.model = model
        self.documents = documents
        self.config = config
        self.probs = config.family_probs()
        tok = model.tokenizer
        self.stop_ids = tuple(tok_lib.stop_token_ids(tok))
        self.special = sorted(tok.all_special_tokens, key=len, reverse=True)
        self.render = rendering.rendering_for(tok, config.format)
        self._doc_tokens: dict[str, np.ndarray] = {}

    def doc_tokens(self, doc_id: str) -> np.ndarray:
        """[N] int32 token ids of a document's text (no special tokens), cached."""
        if doc_id not in self._doc_tokens:
            ids = self.model.tokenizer(self.documents[doc_id].text,
                                       add_special_tokens=False)["input_ids"]
            self._doc_tokens[doc_id] = np.asarray(ids, np.int32)
        return self._doc_tokens[doc_id]

    def plan(self, item: WorkItem) -> Plan:
        """Draws the item's chunk and seed prompt from its seed; no turns yet."""
        cfg = self.config
        rng = np.random.default_rng(item.seed)
        tokens = self.doc_tokens(item.doc_id)
        start, end = chunking.sample_chunk(len(tokens), rng, cfg.chunk_min, cfg.chunk_max)
        family = FAMILIES[int(rng.choice(len(FAMILIES), p=self.probs))]
        doc = self.documents[item.doc_id]
        chunk = self.model.tokenizer.decode(tokens[start:end].tolist())
        conversation = []
        if family == SPANS:
            conversation = spans.conversation(chunk, rng, cfg.span_turns, title=doc.title)
            family = SPANS if conversation else "generic"  # a chunk with no segment
        prompts = SEED_PROMPTS.get(family, ("",))
        seed_prompt = prompts[int(rng.integers(len(prompts)))]
        return Plan(item, (start, end), family, seed_prompt, rendering.titled(doc.title, chunk),
                    conversation)

    def user_prompt(self, plan: Plan) -> list[int]:
        """Agent A's prompt: the seed prompt, then the turns so far with roles swapped."""
        swapped = [{"role": "assistant" if m["role"] == "user" else "user",
                    "content": m["content"]} for m in plan.conversation]
        return self.render.prompt(plan.passage, [{"role": "user", "content": plan.seed_prompt}]
                                  + swapped)

    def answer_prompt(self, plan: Plan) -> list[int]:
        """Agent B's prompt (the teacher's context): the chunk, then the turns so far."""
        return self.render.prompt(plan.passage, plan.conversation)

    def message_text(self, ids: list[int]) -> str:
        """Generated ids -> message text, with special tokens (and their spellings) removed."""
        text = self.model.tokenizer.decode(ids, skip_special_tokens=True)
        for s in self.special:
            text = text.replace(s, "")
        return text.strip()

    def system_tokens(self, plan: Plan) -> list[int]:
        """The document block alone: the shared start of both agents' and the teacher's input."""
        return self.render.document(plan.passage)

    def system_context(self, plans: Sequence[Plan]) -> teacher.SystemContext:
        """Prefills the plans' document blocks (`teacher.prefill_blocks`)."""
        return teacher.prefill_blocks(self.model, [self.system_tokens(p) for p in plans])

    def _generate(self, prompts: list[list[int]], max_new: int, temperature: float,
                  seed: int, context: teacher.SystemContext | None = None,
                  penalties: dict | None = None) -> list[list[int]]:
        params = sampling.SamplingParams(max_new_tokens=max_new, temperature=temperature,
                                         stop_ids=self.stop_ids, **(penalties or {}))
        prefix = None
        if context is not None:
            prompts = [context.strip(i, p) for i, p in enumerate(prompts)]
            prefix = context.prefix(0, len(prompts))
        return sampling.generate(self.model.params, self.model.config, prompts, params,
                                 seed=seed, prefix=prefix)

    def run_batch(self, items: Sequence[WorkItem]) -> tuple[list[dataset.Conversation], int]:
        """Synthesises one batch; returns its conversations (item order) and tokens generated."""
        cfg = self.config
        plans = [self.plan(it) for it in items]
        context = self.system_context(plans)
        generated = 0
        talk = [i for i, p in enumerate(plans) if p.family != SPANS]  # span plans are complete
        if talk:
            sub = context.select(talk)
            for r in range(cfg.rounds):
                outs = self._generate([self.user_prompt(plans[i]) for i in talk],
                                      cfg.max_user_tokens, cfg.user_temperature,
                                      _batch_seed(items, r, 0), sub, cfg.penalties())
                generated += sum(map(len, outs))
                for i, out in zip(talk, outs):
                    # An empty message (A stopped at once) falls back to the seed prompt itself.
                    plans[i].conversation.append(
                        {"role": "user", "content": self.message_text(out) or plans[i].seed_prompt})
                outs = self._generate([self.answer_prompt(plans[i]) for i in talk],
                                      cfg.max_answer_tokens, cfg.answer_temperature,
                                      _batch_seed(items, r, 1), sub, cfg.penalties())
                generated += sum(map(len, outs))
                for i, out in zip(talk, outs):
                    plans[i].conversation.append({"role": "assistant",
                                                  "content": self.message_text(out)})
        views = [self.views(p) for p in plans]
        targets = self.teacher_targets([(t, tg) for t, tg, _, _ in views], context)
        convs = []
        for p, (_, _, student, mask), (ids, logprobs) in zip(plans, views, targets):
            convs.append(dataset.Conversation(
                tokens=student, loss_mask=mask, teacher_ids=ids, teacher_logprobs=logprobs,
                doc_id=p.item.doc_id, conversation_index=p.item.conversation_index,
                chunk_start=p.span[0], chunk_end=p.span[1], seed_family=p.family,
                messages=json.dumps(p.conversation)))
        return convs, generated

    def views(self, plan: Plan):
        """(teacher tokens [Tt], teacher target indices [M], student tokens [T], loss_mask [T])
        of a finished conversation (`teacher.views`)."""
        return teacher.views(self.render, self.system_tokens(plan), plan.conversation,
                             self.stop_ids)

    def teacher_targets(self, rows: list[tuple[np.ndarray, np.ndarray]],
                        context: teacher.SystemContext | None = None
                        ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per row (teacher tokens, target indices [M]) -> (ids [M, k], logprobs [M, k])
        (`teacher.teacher_targets`, with this study's top-k and teacher batch size)."""
        return teacher.teacher_targets(self.model, rows, context, topk=self.config.topk,
                                       batch_size=self.config.teacher_batch_size)


@dataclasses.dataclass(frozen=True)
class Progress:
    """Reported after each written batch of a shard."""

    conversations_done: int  # in the shard, including those of earlier (killed) runs
    conversations_total: int
    conversations_resumed: int  # done before this run started
    generated_tokens: int  # generated in this run
    elapsed_s: float  # since this run started

    @property
    def tokens_per_s(self) -> float:
        """Tokens the agents generated per second (0 for span conversations: built from the
        document's own lines, they generate nothing)."""
        return self.generated_tokens / max(self.elapsed_s, 1e-9)

    @property
    def conversations_per_s(self) -> float:
        """Conversations this run finished per second."""
        return (self.conversations_done - self.conversations_resumed) / max(self.elapsed_s, 1e-9)

    def rate(self) -> str:
        """The rate that means something for this run: generated tokens per second where the
        agents generated any, else conversations per second (span conversations)."""
        if self.generated_tokens:
            return f"{self.tokens_per_s:.1f} generated tok/s"
        return f"{self.conversations_per_s:.2f} conversations/s"

    @property
    def eta_s(self) -> float:
        """Seconds left at this run's conversation rate."""
        return ((self.conversations_total - self.conversations_done)
                / max(self.conversations_per_s, 1e-9))


def run_shard(study: SelfStudy, items: Sequence[WorkItem], data_dir: str, *, batch_size: int,
              shard_index: int = 0, shard_count: int = 1,
              on_batch: Callable[[Progress], None] | None = None) -> dataset.ShardWriter:
    """Synthesises shard `shard_index` of `shard_count` of `items` into `data_dir`, resumably.

    Conversations with a looping answer (`selfstudy_data.keep`) are dropped, and counted
    per family in the manifest.

    `items` are cut into batches of `batch_size` and the shard takes every shard_count-th
    batch from batch shard_index on. Batches, and so every sampled token, are the same for any
    shard count: the union of the shards is the single-shard dataset. Batch j of the shard is
    written as one finalised file before the manifest records it, so a killed run restarts at
    the first unrecorded batch. The manifest records what decides the content (model
    fingerprint, document texts, work items with their seeds, settings); resuming with any of
    them changed raises.
    """
    items = list(items)
    batches = [items[i:i + batch_size]
               for i in range(0, len(items), batch_size)][shard_index::shard_count]
    mine = [it for b in batches for it in b]
    doc_ids = sorted({it.doc_id for it in items})
    run = {"model": study.model.fingerprint, "synthesis": dataclasses.asdict(study.config),
           "batch_size": batch_size, "items": _digest([dataclasses.astuple(it) for it in items]),
           "documents": _digest([dataclasses.astuple(study.documents[d]) for d in doc_ids])}
    writer = dataset.ShardWriter(data_dir, shard_index, shard_count, run=run, doc_ids=doc_ids,
                                 num_items=len(mine), num_batches=len(batches))
    t0, generated, resumed = time.perf_counter(), 0, writer.conversations_done
    pbar = progress.bar(len(mine), f"self-study shard {shard_index}", "conv",
                        initial=writer.conversations_done)
    for j in range(writer.batches_done, len(batches)):
        convs, n = study.run_batch(batches[j])
        pbar.update(len(convs))
        kept, dropped = [], {}
        for c in convs:
            if selfstudy_data.keep(selfstudy_data.answers(c)):
                kept.append(c)
            else:
                dropped[c.seed_family] = dropped.get(c.seed_family, 0) + 1
        writer.write_batch(j, kept, dropped)
        generated += n
        if on_batch is not None:
            on_batch(Progress(writer.conversations_done, len(mine), resumed, generated,
                              time.perf_counter() - t0))
    pbar.close()
    return writer
