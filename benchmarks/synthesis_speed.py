"""Self-study generation speed: cas_jax's batched sampler vs transformers `generate` (PyTorch).

    python -m benchmarks.synthesis_speed [--batch 4] [--user_tokens 32] [--answer_tokens 64]

Both sides run the same conversations: agent A's prompts (Factbook chunk + seed prompt) built by
`synthesis.SelfStudy`, then agent B's prompts holding A's messages (cas_jax's, on both sides),
left-padded into one batch per agent. Model: the embedded SmolLM2-135M-Instruct dequantized to
float32 on both sides (transformers loads the same GGUF). Greedy, exactly `user_tokens` and
`answer_tokens` new tokens per row (no early stop; transformers with min_new_tokens), so both
generate equal token counts; times include prefill, as in synthesis. Before the single timed run,
cas_jax compiles with a shorter call in the same shape buckets and PyTorch warms up on 2 tokens.
Last line: `synthesis_ratio=X` (cas_jax tokens/s over transformers tokens/s).
"""

from __future__ import annotations

import os
import time

from absl import app, flags

flags.DEFINE_string("documents", "fr", "Comma-separated Factbook ids the chunks come from.")
flags.DEFINE_integer("batch", 4, "Conversations per batch.")
flags.DEFINE_integer("chunk_min", 256, "Shortest chunk, in tokens.")
flags.DEFINE_integer("chunk_max", 384, "Longest chunk, in tokens.")
flags.DEFINE_integer("user_tokens", 32, "New tokens per user message (agent A).")
flags.DEFINE_integer("answer_tokens", 64, "New tokens per answer (agent B).")
FLAGS = flags.FLAGS


def main(_):
    import jax
    import torch
    from transformers import AutoModelForCausalLM

    from cas_jax import corpus, sampling, synthesis
    from cas_jax.loading import load_model

    m = load_model()
    docs = corpus.load_factbook(documents=FLAGS.documents.split(","))
    study = synthesis.SelfStudy(m, docs, synthesis.SynthesisConfig(
        chunk_min=FLAGS.chunk_min, chunk_max=FLAGS.chunk_max))
    per_doc = -(-FLAGS.batch // len(docs))
    plans = [study.plan(it) for it in synthesis.work_items(docs.ids, per_doc, 0)[:FLAGS.batch]]

    def jax_generate(prompts, n):
        warm = min(n, sampling.bucket(n) // 2 + 1)  # same compiled program, fewer steps
        t0 = time.perf_counter()
        sampling.generate(m.params, m.config, prompts, sampling.SamplingParams(warm))
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = sampling.generate(m.params, m.config, prompts, sampling.SamplingParams(n))
        return out, time.perf_counter() - t0, compile_s

    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(m.path),
                                              gguf_file=os.path.basename(m.path),
                                              dtype=torch.float32).eval()

    def hf_generate(prompts, n):
        width = max(map(len, prompts))
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1

        def run(k):
            with torch.no_grad():
                return hf.generate(ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k,
                                   do_sample=False, pad_token_id=0)
        run(2)
        t0 = time.perf_counter()
        out = run(n)
        return out[:, width:].tolist(), time.perf_counter() - t0

    user_prompts = [study.user_prompt(p) for p in plans]
    jax_user, jax_user_s, jax_user_c = jax_generate(user_prompts, FLAGS.user_tokens)
    for p, out in zip(plans, jax_user):
        p.conversation.append({"role": "user", "content": study.message_text(out)})
    answer_prompts = [study.answer_prompt(p) for p in plans]
    jax_answer, jax_answer_s, jax_answer_c = jax_generate(answer_prompts, FLAGS.answer_tokens)
    hf_user, hf_user_s = hf_generate(user_prompts, FLAGS.user_tokens)
    hf_answer, hf_answer_s = hf_generate(answer_prompts, FLAGS.answer_tokens)

    tokens = FLAGS.batch * (FLAGS.user_tokens + FLAGS.answer_tokens)
    jax_tps = tokens / (jax_user_s + jax_answer_s)
    hf_tps = tokens / (hf_user_s + hf_answer_s)
    same = sum(a == b for a, b in zip(jax_user + jax_answer, hf_user + hf_answer))
    lens = [len(p) for p in user_prompts + answer_prompts]
    print(f"machine: {os.cpu_count()} CPU threads, jax {jax.__version__} "
          f"({jax.devices()[0].platform}), torch {torch.__version__}")
    print(f"batch {FLAGS.batch}, prompts {min(lens)}-{max(lens)} tokens, new tokens "
          f"{FLAGS.user_tokens} (user) + {FLAGS.answer_tokens} (answer) per row; cas_jax compile "
          f"(warm-up calls) {jax_user_c + jax_answer_c:.1f} s; identical greedy rows "
          f"{same}/{2 * FLAGS.batch}")
    print("| agent | cas_jax s | transformers s |")
    print("|---|---|---|")
    print(f"| A (user) | {jax_user_s:.2f} | {hf_user_s:.2f} |")
    print(f"| B (answer) | {jax_answer_s:.2f} | {hf_answer_s:.2f} |")
    print(f"| generated tok/s | {jax_tps:.1f} | {hf_tps:.1f} |")
    print(f"synthesis_ratio={jax_tps / hf_tps:.3f}")


if __name__ == "__main__":
    app.run(main)
