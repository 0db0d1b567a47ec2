"""Self-study generation speed: cas_jax's batched sampler vs transformers `generate` (PyTorch).

    python -m benchmarks.synthesis_speed [--batch 4] [--user_tokens 32] [--answer_tokens 64]

Both sides run the same conversations: agent A's prompts (Factbook chunk + seed prompt) built by
`synthesis.SelfStudy`, then agent B's prompts holding A's messages (cas_jax's, on both sides),
left-padded into one batch per agent. cas_jax runs them as synthesis does (`--shared_prefill`):
the system message with the chunk is prefilled first and is the prefix of the rest of the prompt
(this prefill is counted in both agents' times); transformers runs whole prompts. Model: the embedded SmolLM2-135M-Instruct dequantized to
float32 on both sides (transformers loads the same GGUF). Greedy, exactly `user_tokens` and
`answer_tokens` new tokens per row (no early stop; transformers with min_new_tokens), so both
generate equal token counts; times include prefill, as in synthesis. Per agent, both sides first
warm up with the fewest new tokens that fall in the same output-length bucket (cas_jax compiles
the program it then runs); then one timed run of each, back to back so both see similar load
on a shared machine (process CPU seconds are printed too). Last line: `synthesis_ratio=X` (cas_jax generated tokens/s over
transformers', wall clock).
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
flags.DEFINE_bool("shared_prefill", True, "cas_jax prefills the system message (chunk) once as "
                  "a prefix of the prompt's rest, as synthesis does; False runs whole prompts.")
FLAGS = flags.FLAGS


def main(_):
    import jax
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from cas_jax.documents import corpus
    from cas_jax.model import sampling
    from cas_jax.model.loading import load_model
    from cas_jax.training import synthesis

    m = load_model()
    docs = corpus.load_factbook(documents=FLAGS.documents.split(","))
    study = synthesis.SelfStudy(m, docs, synthesis.SynthesisConfig(
        chunk_min=FLAGS.chunk_min, chunk_max=FLAGS.chunk_max))
    per_doc = -(-FLAGS.batch // len(docs))
    plans = [study.plan(it) for it in synthesis.work_items(docs.ids, per_doc, 0)[:FLAGS.batch]]

    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(m.path),
                                              gguf_file=os.path.basename(m.path),
                                              dtype=torch.float32).eval()

    def timed(fn, *args):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn(*args)
        return out, time.perf_counter() - wall, time.process_time() - cpu

    def jax_generate(prompts, n):
        if not FLAGS.shared_prefill:
            return sampling.generate(m.params, m.config, prompts, sampling.SamplingParams(n))
        # As `SelfStudy.run_batch`: the system messages (the chunks) are prefilled once and are
        # the prefix of the rest of each prompt. Counted in each agent's time here, though
        # synthesis runs it once for both agents and the teacher.
        context = study.system_context(plans)
        rest = [context.strip(i, p) for i, p in enumerate(prompts)]
        return sampling.generate(m.params, m.config, rest, sampling.SamplingParams(n),
                                 prefix=context.prefix(0, len(rest)))

    def hf_generate(prompts, n):
        width = max(map(len, prompts))
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)
        return out[:, width:].tolist()

    def agent(prompts, n):
        """Warm-ups, then cas_jax and transformers timed back to back."""
        # The fewest new tokens that compile the same program (same output-length bucket).
        warm = next(k for k in range(1, n + 1) if sampling.bucket(k) == sampling.bucket(n))
        _, compile_s, _ = timed(jax_generate, prompts, warm)
        hf_generate(prompts, warm)
        jax_out, jax_s, jax_cpu = timed(jax_generate, prompts, n)
        hf_out, hf_s, hf_cpu = timed(hf_generate, prompts, n)
        return jax_out, hf_out, np.array([jax_s, hf_s, jax_cpu, hf_cpu]), compile_s

    user_prompts = [study.user_prompt(p) for p in plans]
    jax_user, hf_user, user_s, user_c = agent(user_prompts, FLAGS.user_tokens)
    for p, out in zip(plans, jax_user):
        p.conversation.append({"role": "user", "content": study.message_text(out)})
    answer_prompts = [study.answer_prompt(p) for p in plans]
    jax_answer, hf_answer, answer_s, answer_c = agent(answer_prompts, FLAGS.answer_tokens)

    tokens = FLAGS.batch * (FLAGS.user_tokens + FLAGS.answer_tokens)
    jax_s, hf_s, jax_cpu, hf_cpu = user_s + answer_s
    same = sum(a == b for a, b in zip(jax_user + jax_answer, hf_user + hf_answer))
    lens = [len(p) for p in user_prompts + answer_prompts]
    print(f"machine: {os.cpu_count()} CPU threads, jax {jax.__version__} "
          f"({jax.devices()[0].platform}), torch {torch.__version__}")
    print(f"batch {FLAGS.batch}, prompts {min(lens)}-{max(lens)} tokens, new tokens "
          f"{FLAGS.user_tokens} (user) + {FLAGS.answer_tokens} (answer) per row; cas_jax warm-up "
          f"(compile + half the steps) {user_c + answer_c:.1f} s; identical greedy rows "
          f"{same}/{2 * FLAGS.batch}")
    print("| agent | cas_jax s | transformers s | cas_jax CPU s | transformers CPU s |")
    print("|---|---|---|---|---|")
    print("| A (user) | " + " | ".join(f"{x:.2f}" for x in user_s) + " |")
    print("| B (answer) | " + " | ".join(f"{x:.2f}" for x in answer_s) + " |")
    print(f"| generated tok/s (wall) | {tokens / jax_s:.1f} | {tokens / hf_s:.1f} | "
          f"{tokens / jax_cpu:.1f} per CPU s | {tokens / hf_cpu:.1f} per CPU s |")
    print(f"synthesis_ratio={hf_s / jax_s:.3f}")


if __name__ == "__main__":
    app.run(main)
