"""Prefill and decode speed of the JAX model vs transformers (PyTorch), same model and machine.

    python -m benchmarks.model_speed [--batch 16] [--prompt_len 32] [--new_tokens 64]

Both sides: the embedded SmolLM2-135M-Instruct dequantized to float32, greedy decoding of exactly
`new_tokens` tokens per row (no early stop), all CPU threads. Each side runs once untimed (JAX
compiles, PyTorch warms up), then timed. Decode tokens/s = batch * new_tokens / time of a full
generate call minus its prefill; prefill tokens/s = tokens of one forward over
[prefill_batch, prefill_len] / its time. Last line: `decode_ratio=X prefill_ratio=Y`.
"""

from __future__ import annotations

import os
import time

from absl import app, flags

flags.DEFINE_integer("batch", 16, "Decode batch size.")
flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per row for decoding.")
flags.DEFINE_integer("new_tokens", 64, "Generated tokens per row.")
flags.DEFINE_integer("prefill_batch", 4, "Rows in the prefill measurement.")
flags.DEFINE_integer("prefill_len", 256, "Tokens per row in the prefill measurement.")
flags.DEFINE_integer("repeats", 2, "Timed repetitions; the best is kept.")
FLAGS = flags.FLAGS


def _best(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(_):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from cas_jax.model import sampling
    from cas_jax.model.llama import forward_jit
    from cas_jax.model.loading import default_model_path, load_model

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    b, n_new = FLAGS.batch, FLAGS.new_tokens
    prompts = rng.integers(100, 40000, size=(b, FLAGS.prompt_len))
    pre = rng.integers(100, 40000, size=(FLAGS.prefill_batch, FLAGS.prefill_len))

    m = load_model()
    sp = sampling.SamplingParams(max_new_tokens=n_new)
    sp1 = sampling.SamplingParams(max_new_tokens=1)
    rows = [list(map(int, r)) for r in prompts]
    jax_gen = _best(lambda: sampling.generate(m.params, m.config, rows, sp), FLAGS.repeats)
    jax_first = _best(lambda: sampling.generate(m.params, m.config, rows, sp1), FLAGS.repeats)
    pos = jnp.broadcast_to(jnp.arange(FLAGS.prefill_len), pre.shape)
    toks = jnp.asarray(pre)
    jax_prefill = _best(lambda: jax.block_until_ready(
        forward_jit(m.params, toks, pos, config=m.config)[0]), FLAGS.repeats)

    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                              gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def hf_generate(n):
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=0)

    hf_gen = _best(lambda: hf_generate(n_new), FLAGS.repeats)
    hf_first = _best(lambda: hf_generate(1), FLAGS.repeats)
    pre_t = torch.tensor(pre)

    def hf_prefill():
        with torch.no_grad():
            hf(pre_t)
    hf_prefill_s = _best(hf_prefill, FLAGS.repeats)

    dec_tokens = b * (n_new - 1)
    jax_dec = dec_tokens / max(jax_gen - jax_first, 1e-9)
    hf_dec = dec_tokens / max(hf_gen - hf_first, 1e-9)
    n_pre = pre.size
    jax_pre, hf_pre = n_pre / jax_prefill, n_pre / hf_prefill_s
    print(f"machine: {os.cpu_count()} CPU threads, jax {jax.__version__} "
          f"({jax.devices()[0].platform}), torch {torch.__version__}")
    print("| measurement | cas_jax tok/s | transformers tok/s | ratio |")
    print("|---|---|---|---|")
    print(f"| decode, batch {b}, {FLAGS.prompt_len}+{n_new} tokens | {jax_dec:.1f} | "
          f"{hf_dec:.1f} | {jax_dec / hf_dec:.2f} |")
    print(f"| prefill, {pre.shape[0]}x{pre.shape[1]} tokens | {jax_pre:.1f} | {hf_pre:.1f} | "
          f"{jax_pre / hf_pre:.2f} |")
    print(f"decode_ratio={jax_dec / hf_dec:.3f} prefill_ratio={jax_pre / hf_pre:.3f}")


if __name__ == "__main__":
    app.run(main)
