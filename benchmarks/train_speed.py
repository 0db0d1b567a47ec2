"""Cartridge training-step speed: cas_jax vs transformers (PyTorch), same model, batch and machine.

    python -m benchmarks.train_speed [--batch 1] [--seq_len 128] [--tokens 128,512,2048]

One training step = forward of [batch, seq_len] conversation tokens after a cartridge of P
tokens, distillation loss against a top-20 teacher on every position but the last, backward to
the cartridge only (model frozen, sink frozen), gradient clipping and an Adam update. Both sides:
the embedded SmolLM2-135M-Instruct dequantized to float32, the same cartridge (the KV cache of
the same P tokens) and batch, all CPU threads.
  cas_jax:       `train.make_train_step` (jitted; the chunked loss computes logits per chunk).
  transformers:  LlamaForCausalLM, eager attention, the cartridge as a trainable
                 past_key_values prefix (DynamicCache), full [B, T, V] logits, torch.optim.Adam.
Each side runs in its own process (so peak RSS is per side): one untimed step (JAX compiles),
then `--steps` timed steps; the fastest is reported. Peak RSS is the process's maximum so far,
after that P (P runs in increasing order). The first-step losses of both sides are printed
as a check that they compute the same thing. Last line: `train_ratio_p512=X` (cas_jax tokens/s
over transformers tokens/s at P=512).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_integer("batch", 1, "Conversations per step.")
flags.DEFINE_integer("seq_len", 128, "Conversation tokens per row.")
flags.DEFINE_list("tokens", ["128", "512", "2048"], "Cartridge sizes P.")
flags.DEFINE_integer("steps", 2, "Timed steps per P; the fastest counts.")
flags.DEFINE_integer("topk", 20, "Teacher top-k.")
flags.DEFINE_enum("side", "both", ["both", "jax", "torch"], "Internal: which side this process "
                  "measures ('both' runs one child process per side).")
FLAGS = flags.FLAGS

VOCAB_LOW, VOCAB_HIGH = 100, 40000
LR = 1e-3


def _inputs(p: int):
    """Cartridge token ids [P] and a batch (numpy) shared by both sides."""
    import numpy as np

    rng = np.random.default_rng(0)
    b, t, k = FLAGS.batch, FLAGS.seq_len, FLAGS.topk
    logprobs = np.sort(np.log(rng.dirichlet(np.ones(k) * 0.3, (b, t))), axis=-1)[..., ::-1]
    batch = {"tokens": rng.integers(VOCAB_LOW, VOCAB_HIGH, (b, t)).astype(np.int32),
             "length": np.full((b,), t, np.int32),
             "loss_mask": np.broadcast_to(np.arange(t) < t - 1, (b, t)).copy(),
             "teacher_ids": rng.integers(VOCAB_LOW, VOCAB_HIGH, (b, t, k)).astype(np.int32),
             "teacher_logprobs": np.ascontiguousarray(logprobs, np.float32)}
    cartridge_ids = rng.integers(VOCAB_LOW, VOCAB_HIGH, p).astype(np.int32)
    return cartridge_ids, batch


def _timed(step, steps: int) -> tuple[float, float]:
    """(loss of the first, untimed step; fastest of `steps` timed steps in seconds)."""
    first = step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return first, min(times)


def _load_jax():
    from cas_jax.model import loading

    return loading.load_model()


def _measure_jax(model, p: int) -> tuple[float, float]:
    import jax

    from cas_jax.cartridges import cartridge as cart_lib
    from cas_jax.training import train as train_lib

    cartridge_ids, batch = _inputs(p)
    cartridge = cart_lib.init_from_tokens(model.config, model.params, cartridge_ids,
                                          fingerprint=model.fingerprint)
    cfg = train_lib.TrainConfig(lr=LR)
    mesh = train_lib.make_mesh(1)
    rep = train_lib.replicated(mesh)
    state = [jax.device_put(train_lib.init_train_state([cartridge], cfg), rep)]
    params = jax.device_put(model.params, rep)
    step_fn = train_lib.make_train_step(model.config, cfg, mesh)
    device_batch = train_lib.device_batch(batch, mesh)

    def step():
        state[0], metrics = step_fn(state[0], params, device_batch)
        return float(metrics["loss"])

    return _timed(step, FLAGS.steps)


def _load_torch():
    import torch
    from transformers import AutoModelForCausalLM

    from cas_jax.model.loading import default_model_path

    torch.set_num_threads(os.cpu_count())
    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
        attn_implementation="eager").eval()
    return hf.requires_grad_(False)


def _measure_torch(hf, p: int) -> tuple[float, float]:
    import torch
    from transformers import DynamicCache

    cartridge_ids, batch = _inputs(p)
    with torch.no_grad():
        cache = hf(torch.tensor(cartridge_ids[None], dtype=torch.long), use_cache=True
                   ).past_key_values
    sinks = [(layer.keys[:, :, :1].clone(), layer.values[:, :, :1].clone())
             for layer in cache.layers]
    trainable = [torch.nn.Parameter(t[:, :, 1:].clone()) for layer in cache.layers
                 for t in (layer.keys, layer.values)]
    opt = torch.optim.Adam(trainable, lr=LR)
    b, t = batch["tokens"].shape
    tokens = torch.tensor(batch["tokens"], dtype=torch.long)
    positions = (p + torch.arange(t))[None].expand(b, t)
    attention_mask = torch.ones(b, p + t, dtype=torch.long)
    ids = torch.tensor(batch["teacher_ids"], dtype=torch.long)
    teacher = torch.softmax(torch.tensor(batch["teacher_logprobs"]), dim=-1)
    mask = torch.tensor(batch["loss_mask"])

    def step():
        prefix = DynamicCache()
        for i, (sink_k, sink_v) in enumerate(sinks):
            k = torch.cat([sink_k, trainable[2 * i]], dim=2).expand(b, -1, -1, -1)
            v = torch.cat([sink_v, trainable[2 * i + 1]], dim=2).expand(b, -1, -1, -1)
            prefix.update(k, v, i)
        logits = hf(input_ids=tokens, position_ids=positions, attention_mask=attention_mask,
                    past_key_values=prefix, use_cache=True).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        per_token = -(teacher * torch.gather(logp, -1, ids)).sum(-1)
        loss = (per_token * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        return float(loss)

    return _timed(step, FLAGS.steps)


def _child(side: str) -> None:
    """Measures every P on one side; prints one JSON line per P."""
    load, measure = (_load_jax, _measure_jax) if side == "jax" else (_load_torch, _measure_torch)
    model = load()
    for p in sorted(int(x) for x in FLAGS.tokens):
        loss, seconds = measure(model, p)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
        print(json.dumps({"p": p, "loss": loss, "seconds": seconds, "peak_rss_mib": rss}),
              flush=True)


def _run_side(side: str) -> dict[int, dict]:
    args = [sys.executable, "-m", "benchmarks.train_speed", f"--side={side}",
            f"--batch={FLAGS.batch}", f"--seq_len={FLAGS.seq_len}",
            f"--tokens={','.join(FLAGS.tokens)}", f"--steps={FLAGS.steps}",
            f"--topk={FLAGS.topk}"]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} side failed:\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["p"]: r for r in rows}


def main(_):
    if FLAGS.side != "both":
        _child(FLAGS.side)
        return
    import jax
    import torch

    t0 = time.perf_counter()
    jax_rows = _run_side("jax")
    torch_rows = _run_side("torch")
    tokens = FLAGS.batch * FLAGS.seq_len
    print(f"machine: {os.cpu_count()} CPU threads, jax {jax.__version__} "
          f"({jax.devices()[0].platform}), torch {torch.__version__}; batch {FLAGS.batch} x "
          f"{FLAGS.seq_len} tokens, top-{FLAGS.topk}, float32; {time.perf_counter() - t0:.0f} s")
    print("| P | cas_jax tok/s | transformers tok/s | ratio | cas_jax peak RSS MiB | "
          "transformers peak RSS MiB | first-step loss jax / torch |")
    print("|---|---|---|---|---|---|---|")
    ratios = {}
    for p in sorted(jax_rows):
        j, t = jax_rows[p], torch_rows[p]
        jt, tt = tokens / j["seconds"], tokens / t["seconds"]
        ratios[p] = jt / tt
        print(f"| {p} | {jt:.1f} | {tt:.1f} | {ratios[p]:.2f} | {j['peak_rss_mib']:.0f} | "
              f"{t['peak_rss_mib']:.0f} | {j['loss']:.4f} / {t['loss']:.4f} |")
    if 512 in ratios:
        print(f"train_ratio_p512={ratios[512]:.3f}")


if __name__ == "__main__":
    app.run(main)
