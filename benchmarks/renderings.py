"""Which layout of "document, then question" lets the model read its document?

  python -m benchmarks.renderings --profiles=20

Scores multiple-choice Factbook questions (cloze: each option as the reply, mean log-prob per
option token) with the question's section document in context and without it, under several
renderings, on DEV profiles only (`cas_jax.studies.splits`), never on the study's test profiles. The
rendering with the largest ICL - closed book gap is the one `cas_jax.model.rendering` uses.

  template_default  document as a system turn, then the chat template's own rendering of the
                    question, which (SmolLM2) inserts its default system turn in between
                    (cas_jax before this benchmark)
  system            document as the system turn, question turn directly after it
  plain             document as raw text, then the ChatML question turn
  user              document and question in one user turn
  plain_qa          no chat template: document, then "Question: ...\\nAnswer:"

Last line: `best=<name> gap=<ICL - closed book accuracy>`.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags

from cas_jax.cartridges import attention
from cas_jax.documents import corpus
from cas_jax.evaluation import questions as questions_lib, scoring
from cas_jax.model import loading, rendering, tokenizer as tok_lib
from cas_jax.studies import splits

FLAGS = flags.FLAGS
flags.DEFINE_integer("profiles", 20, "Dev profiles to draw questions from.")
flags.DEFINE_list("sections", ["geography", "communications", "transportation"],
                  "Section slugs whose questions are asked (the shorter sections: ICL over the "
                  "2k-token ones costs minutes per document on a 2-core CPU).")
flags.DEFINE_integer("seed", 0, "Question seed.")
flags.DEFINE_string("out", "runs/renderings", "Output folder (table and per-question JSON).")

NAMES = ("template_default", "system", "plain", "user", "plain_qa")


def _layouts(tok, doc: str, question: str, name: str) -> tuple[list[int], list[int], str]:
    """(document block, query tokens, reply prefix) of one rendering."""
    enc = lambda s: list(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    user = [{"role": "user", "content": question}]
    if name == "template_default":
        block = rendering.Rendering(tok, "system").document(doc)
        return block, tok_lib.encode_chat(tok, user), ""
    if name in ("system", "plain"):
        r = rendering.Rendering(tok, name)
        return r.document(doc), r.conversation(user), ""
    if name == "user":
        return (enc(f"<|im_start|>user\n{doc}\n\n"),
                enc(f"{question}<|im_end|>\n<|im_start|>assistant\n"), "")
    return enc(f"{doc}\n\n"), enc(f"Question: {question}\nAnswer:"), " "


def _closed(tok, question: str, name: str) -> list[int]:
    enc = lambda s: list(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    user = [{"role": "user", "content": question}]
    if name == "template_default":
        return tok_lib.encode_chat(tok, user)
    if name in ("system", "plain"):
        return rendering.Rendering(tok, name).conversation(user)
    if name == "user":
        return enc(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    return enc(f"Question: {question}\nAnswer:")


def _score(model, qs, queries, reply_prefix, bank=None, slot_of=None):
    tok = model.tokenizer
    owner, prompts, conts = [], [], []
    for qi, q in enumerate(qs):
        for o in q.options:
            owner.append(qi)
            prompts.append(queries[qi])
            conts.append(list(tok(reply_prefix + o, add_special_tokens=False)["input_ids"]))
    sel = None if bank is None else [[slot_of[qs[i].doc_id]] for i in owner]
    lps = scoring.score_continuations(model, prompts, conts, bank=bank, selections=sel, slots=1)
    correct, nll, row = [], [], 0
    for q in qs:
        means = [float(lp.mean()) for lp in lps[row:row + len(q.options)]]
        correct.append(int(np.argmax(means)) == q.answer)
        nll.append(-means[q.answer])
        row += len(q.options)
    return correct, nll


def main(argv):
    del argv
    model = loading.load_model()
    tok = model.tokenizer
    profiles = splits.dev_profiles()[:FLAGS.profiles]
    qs = questions_lib.to_section_questions(
        questions_lib.generate_factbook_questions(profiles, 15, FLAGS.seed))
    qs = [q for q in qs if q.doc_id.split("-", 1)[1] in FLAGS.sections]
    docs = corpus.load_factbook_sections(documents=sorted({q.doc_id for q in qs}))
    print(f"{len(qs)} questions on {len(docs)} section documents of {len(profiles)} dev "
          f"profiles", flush=True)
    rows, per_q = [], {}
    for name in NAMES:
        prefix = _layouts(tok, "x", "x", name)[2]
        icl, icl_nll = [None] * len(qs), [None] * len(qs)
        ids = list(docs.ids)
        blocks = {d: _layouts(tok, docs[d].text, "", name)[0] for d in ids}
        slots = -(-max(map(len, blocks.values())) // 256) * 256  # one bank shape: one compile
        for g in range(0, len(ids), 8):  # 8 documents' K/V resident at a time
            group = ids[g:g + 8]
            kv = scoring.prefill_contexts(model, [blocks[d] for d in group], group)
            bank = attention.bank_from_cartridges(kv, 8, slots)
            idx = [i for i, q in enumerate(qs) if q.doc_id in group]
            sub = [qs[i] for i in idx]
            queries = [_layouts(tok, docs[q.doc_id].text, q.question, name)[1] for q in sub]
            c, n = _score(model, sub, queries, prefix, bank, {d: i for i, d in enumerate(group)})
            for i, ci, ni in zip(idx, c, n):
                icl[i], icl_nll[i] = ci, ni
        closed, closed_nll = _score(model, qs, [_closed(tok, q.question, name) for q in qs],
                                    prefix)
        rows.append((name, np.mean(icl), np.mean(closed), np.mean(icl_nll), np.mean(closed_nll)))
        per_q[name] = {"icl": icl, "closed_book": closed}
        print(f"  {name}: ICL {rows[-1][1]:.3f}, closed book {rows[-1][2]:.3f}", flush=True)
    table = ["| rendering | ICL acc | closed-book acc | gap | ICL gold NLL | closed-book NLL |",
             "|---|---|---|---|---|---|"]
    table += [f"| {n} | {a:.3f} | {c:.3f} | {a - c:+.3f} | {an:.3f} | {cn:.3f} |"
              for n, a, c, an, cn in rows]
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "renderings.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    with open(os.path.join(FLAGS.out, "renderings.json"), "w") as f:
        json.dump({"profiles": profiles, "num_questions": len(qs), "per_question": per_q}, f)
    print("\n".join(table))
    best = max(rows, key=lambda r: r[1] - r[2])
    print(f"best={best[0]} gap={best[1] - best[2]:.3f}")


if __name__ == "__main__":
    app.run(main)
