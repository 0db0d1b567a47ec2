"""How much document information a self-study dataset carries, per seed family.

Per conversation (its assistant turns):
  looping        some word 6-gram occurs 3 or more times in one answer
  grounding      share of an answer's word 4-grams that occur in its chunk (answers of fewer
                 than 4 words: share of their words), mean over the conversation's answers
  context_gain   KL(teacher || no-context student) in nats per answer token: the teacher's
                 top-k (renormalised, as the distillation loss uses it) against the frozen
                 model reading the conversation with no document; what a cartridge can learn
                 and the model without one does not know. It is also the distillation loss of
                 the no-cartridge student minus the teacher's entropy.
`keep` is the synthesis filter: a conversation with a looping answer is dropped.
Words are casefolded runs of letters and digits.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cas_jax.model import llama as model_lib, rendering, sampling
from cas_jax.training import dataset, losses, spans
from cas_jax.training.dataset import Conversation

_WORD = re.compile(r"[0-9a-z]+")
LOOP_N, LOOP_REPEATS, GROUND_N = 6, 3, 4


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def _ngrams(ws: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]


def is_looping(text: str) -> bool:
    """True iff some word 6-gram occurs at least 3 times in `text`."""
    counts = Counter(_ngrams(words(text), LOOP_N))
    return bool(counts) and max(counts.values()) >= LOOP_REPEATS


def grounding(answer: str, chunk: str) -> float:
    """Share of the answer's word 4-grams found in the chunk (words, for short answers); an
    answer with no words scores 0."""
    aw, cw = words(answer), words(chunk)
    if len(aw) < GROUND_N:
        return float(np.mean([w in set(cw) for w in aw])) if aw else 0.0
    grams = set(_ngrams(cw, GROUND_N))
    return float(np.mean([g in grams for g in _ngrams(aw, GROUND_N)]))


def answers(conv: Conversation) -> list[str]:
    """The assistant turns' texts of a stored conversation."""
    return spans.answers(json.loads(conv.messages))


def keep(answer_texts: Iterable[str]) -> bool:
    """The synthesis filter: no looping answer."""
    return not any(is_looping(a) for a in answer_texts)


@functools.partial(jax.jit, static_argnames=("config",))
def _student_kl(params, tokens, positions, mask, teacher_ids, teacher_logprobs, *, config):
    """Per row: (sum of KL(teacher || student) over masked positions, masked count)."""
    logits, _ = model_lib.forward(params, tokens, positions, config=config)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    student = jnp.take_along_axis(logp, teacher_ids, axis=-1)
    q = losses.teacher_probs(teacher_logprobs)
    kl = jnp.sum(jnp.where(q > 0, q * (jnp.log(jnp.maximum(q, 1e-30)) - student), 0.0), -1)
    return jnp.sum(jnp.where(mask, kl, 0.0), axis=1), jnp.sum(mask, axis=1)


def context_gain(model, convs: Sequence[Conversation], batch: int = 8) -> list[float]:
    """Per conversation, mean KL(teacher || no-context student) per answer token (nats)."""
    out = []
    k = convs[0].teacher_ids.shape[1] if convs else 0
    for i in range(0, len(convs), batch):
        group = list(convs[i:i + batch])
        b = sampling.bucket(len(group), minimum=1)
        t = sampling.bucket(max(len(c.tokens) for c in group))
        tokens, positions = sampling.right_pad([c.tokens for c in group], t, b)
        mask = np.zeros((b, t), bool)
        ids = np.zeros((b, t, k), np.int32)
        lps = np.zeros((b, t, k), np.float32)
        for r, c in enumerate(group):
            where = np.flatnonzero(c.loss_mask)
            mask[r, where] = True
            ids[r, where], lps[r, where] = c.teacher_ids, c.teacher_logprobs
        total, count = _student_kl(model.params, jnp.asarray(tokens), jnp.asarray(positions),
                                   jnp.asarray(mask), jnp.asarray(ids), jnp.asarray(lps),
                                   config=model.config)
        total, count = np.asarray(total), np.asarray(count)
        out += [float(total[r] / max(count[r], 1)) for r in range(len(group))]
    return out


@dataclasses.dataclass(frozen=True)
class FamilyReport:
    family: str
    conversations: int
    looping: float  # share of conversations with a looping answer
    grounding_median: float
    context_gain_mean: float  # nats per answer token
    kept: float  # share that passes `keep`


def report(model, convs: Sequence[Conversation], chunk_texts: Sequence[str],
           dropped: dict[str, int] | None = None) -> list[FamilyReport]:
    """Quality per seed family and over all ("all"), for `convs` with their chunks' texts.

    dropped: conversations per family already removed by the filter (counted as looping and
    not kept; their grounding and gain are unknown and left out)."""
    dropped = dropped or {}
    gains = context_gain(model, convs) if convs else []
    rows: dict[str, list] = {}
    for c, chunk, g in zip(convs, chunk_texts, gains):
        texts = answers(c)
        rows.setdefault(c.seed_family, []).append(
            (not keep(texts), float(np.mean([grounding(a, chunk) for a in texts] or [0.0])), g))
    out = []
    families = sorted(set(rows) | set(dropped))
    for fam in families + ["all"]:
        rs = [r for f in families for r in rows.get(f, [])] if fam == "all" else rows.get(fam, [])
        n_drop = sum(dropped.values()) if fam == "all" else dropped.get(fam, 0)
        n = len(rs) + n_drop
        if n == 0:
            continue
        loops = sum(r[0] for r in rs) + n_drop
        out.append(FamilyReport(
            fam, n, loops / n,
            float(np.median([r[1] for r in rs])) if rs else float("nan"),
            float(np.mean([r[2] for r in rs])) if rs else float("nan"), 1 - loops / n))
    return out


def format_report(rows: Sequence[FamilyReport]) -> str:
    lines = ["| family | conversations | looping | grounding (median) | context gain (nats/tok) "
             "| kept |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.family} | {r.conversations} | {r.looping:.3f} | {r.grounding_median:.3f} "
              f"| {r.context_gain_mean:.3f} | {r.kept:.3f} |" for r in rows]
    return "\n".join(lines)


def dataset_report(model, data_dir: str, documents, limit: int | None = None,
                   seed: int = 0) -> list[FamilyReport]:
    """`report` over a synthesis folder (`limit`: a seeded sample of that many conversations);
    `documents` maps doc_id -> Document (the collection it was synthesised from)."""
    source = dataset.ConversationSource(data_dir)
    idx = np.arange(len(source))
    if limit is not None and limit < len(idx):
        idx = np.sort(np.random.default_rng(seed).choice(idx, limit, replace=False))
    convs = [source[int(i)] for i in idx]
    missing = sorted({c.doc_id for c in convs} - set(documents))
    if missing:
        raise KeyError(f"{data_dir}: conversations about documents {missing[:5]} that are not "
                       "in the collection given")
    tok = model.tokenizer
    cache: dict[str, list[int]] = {}
    chunks = []
    for c in convs:
        if c.doc_id not in cache:
            cache[c.doc_id] = tok(documents[c.doc_id].text, add_special_tokens=False)["input_ids"]
        chunks.append(rendering.titled(documents[c.doc_id].title,
                                              tok.decode(cache[c.doc_id][c.chunk_start:c.chunk_end])))
    dropped = dataset.dropped_counts(data_dir)
    if limit is not None and len(source):
        scale = len(convs) / len(source)
        dropped = {f: int(round(n * scale)) for f, n in dropped.items()}
    return report(model, convs, chunks, dropped)
