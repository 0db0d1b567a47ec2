"""Where a serving decode step's time goes as rows and the cartridge prefix grow.

    python -m benchmarks.decode_rows [--rows=16,32,64] [--prefix_tokens=0,256] [--slots=128]

Times the continuous engine's own decode-step kernel (`serving.kernels`, key ("step", R, S,
prefixed)) on the embedded model, for R rows of S ring slots each, with no prefix or a
one-cartridge prefix of P tokens per row (what one cartridge per request costs: each row reads
its own composed K/V). Beside it, the prefix's attention alone (scores and values over P keys
for one query per row, every layer) under XLA and as numpy's batched matmul of the same
contraction, and the bytes a step must read from the prefix. The step's cost per row tells
whether larger batches pay: a step whose time grows in proportion to its rows gives
continuous batching nothing over a smaller static batch.

Table columns: ms per step, ms per row, rows x steps per second (decode tok/s), the prefix's
bytes per step and, for P > 0, the step's extra time over P = 0 at the same R and the
attention-alone times. Last line: `prefix_ms_per_row=A attention_xla_vs_numpy=B` at the
largest R and P (A: the extra step time per row that the prefix costs).
"""

from __future__ import annotations

import time

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The launcher's flags, defined when it runs (the module is imported by tests without
    them: absl refuses a flag name defined twice in one process)."""
    flags.DEFINE_list("rows", ["16", "32", "64"], "Rows per decode step (R).")
    flags.DEFINE_list("prefix_tokens", ["0", "256"], "Cartridge tokens per row (P; 0 = no prefix).")
    flags.DEFINE_integer("slots", 128, "KV ring slots per row (S).")
    flags.DEFINE_integer("steps", 10, "Timed steps per cell (after one untimed).")


def _step_kernel(model, rows: int, slots: int, prefix_tokens: int):
    """The engine's compiled decode step and an empty pool for it."""
    import jax.numpy as jnp

    from cas_jax.cartridges import attention
    from cas_jax.serving.kernels import Kernels

    c = model.config
    shape = (1, c.num_layers, max(prefix_tokens, 1), c.num_kv_heads, c.head_dim)
    bank = attention.CartridgeBank(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32),
                                   jnp.zeros((1,), jnp.int32))
    kernels = Kernels(model, bank, 1, attention.PARALLEL, on_ready=lambda: None)
    key = ("step", rows, slots, prefix_tokens > 0)
    while (fn := kernels.get(key)) is None:
        time.sleep(0.05)
    pool = kernels.empty_pool(rows, slots, prefix_tokens > 0)
    return kernels, fn, pool


def time_step(model, rows: int, slots: int, prefix_tokens: int, steps: int) -> float:
    """Seconds per decode step of `rows` live rows (the engine's kernel)."""
    import jax
    import numpy as np

    from cas_jax.serving.row_sampling import row_arrays, rows_tuple

    kernels, fn, (cache, prefix, counts) = _step_kernel(model, rows, slots, prefix_tokens)
    tokens = jax.device_put(np.full((rows,), 100, np.int32))
    positions = jax.device_put(np.full((rows,), slots + prefix_tokens, np.int32))
    sampling = rows_tuple(row_arrays(rows), False)
    try:
        out = None
        for i in range(steps + 1):
            if i == 1:
                jax.block_until_ready(out)
                t0 = time.perf_counter()
            cache, counts, *out = fn(kernels.step_params, cache, prefix, counts, tokens,
                                     positions, np.int32(i % slots), sampling)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / steps
    finally:
        kernels.close()


def time_attention(config, rows: int, prefix_tokens: int, repeats: int) -> tuple[float, float]:
    """Seconds for one query per row to attend over its own `prefix_tokens` keys in every layer:
    (XLA, as the decoder computes it; numpy batched matmul of the same contraction)."""
    import jax
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (config.num_layers, rows, prefix_tokens, config.num_kv_heads, config.head_dim)
    k = rng.standard_normal(shape, np.float32)
    v = rng.standard_normal(shape, np.float32)
    q = rng.standard_normal((config.num_layers, rows, 1, config.num_heads, config.head_dim),
                            np.float32)
    xla = jax.jit(xla_attention)
    args = jax.device_put((q, k, v))
    jax.block_until_ready(xla(*args))
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = xla(*args)
    jax.block_until_ready(out)
    t_xla = (time.perf_counter() - t0) / repeats

    kn, vn = numpy_layout(k, v)
    t0 = time.perf_counter()
    for _ in range(repeats):
        numpy_attention(q, kn, vn)
    return t_xla, (time.perf_counter() - t0) / repeats


def xla_attention(q, k, v):
    """`llama.attend` of q [L, R, 1, H, Dh] over one block k, v [L, R, P, K, Dh] (every key
    visible) in every layer, as the decoder computes a prefix block -> [L, R, 1, H, Dh]."""
    import jax.numpy as jnp

    from cas_jax.model import llama

    visible = jnp.ones((k.shape[1], 1, k.shape[2]), bool)
    return jnp.stack([llama.attend(q[i], [(k[i], v[i], visible)]) for i in range(k.shape[0])])


def numpy_layout(k, v):
    """k, v [L, R, P, K, Dh] -> [L, R*K, Dh, P] and [L, R*K, P, Dh]: the layouts in which
    `numpy_attention`'s matmuls read contiguous memory (made once, outside its timing)."""
    import numpy as np

    n_layers, rows, p, kh, dh = k.shape
    return (np.ascontiguousarray(k.transpose(0, 1, 3, 4, 2)).reshape(n_layers, rows * kh, dh, p),
            np.ascontiguousarray(v.transpose(0, 1, 3, 2, 4)).reshape(n_layers, rows * kh, p, dh))


def numpy_attention(q, kn, vn):
    """`xla_attention` of q over `numpy_layout(k, v)`, layer by layer as numpy batched
    matmuls."""
    import numpy as np

    n_layers, rows, _, h, dh = q.shape
    g = h // (kn.shape[1] // rows)
    qn = q.reshape(n_layers, kn.shape[1], g, dh)
    out = np.empty(qn.shape, np.float32)
    for i in range(n_layers):
        s = np.matmul(qn[i], kn[i]) / np.sqrt(dh)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[i] = np.matmul(p / p.sum(-1, keepdims=True), vn[i])
    return out.reshape(q.shape)


def main(_):
    from cas_jax.model.loading import load_model

    model = load_model()
    c = model.config
    rows_list = [int(r) for r in FLAGS.rows]
    prefixes = [int(p) for p in FLAGS.prefix_tokens]
    bytes_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4  # float32 K and V
    print(f"decode step of the continuous engine: S={FLAGS.slots} slots per row, "
          f"{FLAGS.steps} timed steps per cell; prefix of P tokens per row (one cartridge)")
    print(f"{'R':>4} {'P':>5} {'ms/step':>8} {'ms/row':>7} {'tok/s':>7} {'prefix MB':>9} "
          f"{'extra ms':>8} {'attn xla ms':>11} {'attn numpy ms':>13}")
    base: dict[int, float] = {}
    last = None
    for p in prefixes:
        for r in rows_list:
            t = time_step(model, r, FLAGS.slots, p, FLAGS.steps)
            mb = r * p * bytes_per_token / 1e6
            extra = attn = ""
            if p == 0:
                base[r] = t
            else:
                t_xla, t_np = time_attention(c, r, p, max(FLAGS.steps // 2, 1))
                attn = f"{t_xla * 1e3:11.1f} {t_np * 1e3:13.1f}"
                if r in base:
                    extra = f"{(t - base[r]) * 1e3:8.1f}"
                    last = ((t - base[r]) / r, t_xla / t_np)
            print(f"{r:4d} {p:5d} {t * 1e3:8.1f} {t * 1e3 / r:7.2f} {r / t:7.1f} {mb:9.1f} "
                  f"{extra:>8} {attn}", flush=True)
    if last is not None:
        print(f"prefix_ms_per_row={last[0] * 1e3:.2f} attention_xla_vs_numpy={last[1]:.2f}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
