"""Paging speed of the BudgetManager against plain reads of the same files, and I/O wait in a loop.

    python -m benchmarks.paging [--num_cartridges 128] [--tokens 128] [--steps 30] ...

Setup: a fresh CartridgeStore of `num_cartridges` cartridges [layers, tokens, kv_heads, head_dim]
in bf16 (defaults: SmolLM2-135M, 30 layers, 3 kv heads, head_dim 64), each with an Adam state
(mu, nu in bf16, count) as in training, so a cartridge pages 3x its K/V bytes.

1. Bandwidth. Every cartridge is paged in once through a BudgetManager (store read with its
   CRC-32C checks, then `jax.device_put`; acquire + release, no prefetch): paged GB/s = bytes
   paged in / (read seconds + device_put seconds). Raw GB/s: the same data files read once each
   with plain numpy (`np.fromfile`, and `readinto` into a preallocated array; the faster counts).
   Both are measured with the OS page cache cold (every store file fsynced, then dropped from the
   cache with posix_fadvise(DONTNEED) right before each pass) and warm (an untimed read of every
   file right before each pass), interleaved, best of `repeats`. On a VM, "cold" means the guest's
   cache only: the host may still cache the disk.
2. Training loop. `steps` steps, each acquiring `per_step` random cartridges, running a jitted
   matmul workload of about `compute_ms`, updating every acquired cartridge (so evictions write
   back) and releasing them; the budget holds `budget_fraction` of the store. Run with prefetch
   off, then on (prefetch of step t+1 is issued right after step t's acquire), each starting
   from a cold page cache (files written back during a run are then cached). I/O wait share =
   seconds blocked in acquire / loop seconds. Compute, reads, checksums, offloads and writes all
   share the host's CPUs here; on an accelerator host the compute would not.

Last line: `paging_efficiency=X` = cold-cache paged GB/s over cold-cache raw GB/s (the case the
store exists for: paging from persistent storage); the warm ratio is printed in the table.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from absl import app, flags

from benchmarks.fileio import drop_page_cache, files_under, live_data_files

flags.DEFINE_integer("num_cartridges", 128, "Cartridges in the store.")
flags.DEFINE_integer("tokens", 128, "Tokens per cartridge.")
flags.DEFINE_integer("layers", 30, "Layers (SmolLM2-135M: 30).")
flags.DEFINE_integer("kv_heads", 3, "KV heads (SmolLM2-135M: 3).")
flags.DEFINE_integer("head_dim", 64, "Head dim (SmolLM2-135M: 64).")
flags.DEFINE_float("budget_fraction", 0.25, "Device budget as a fraction of the store's bytes.")
flags.DEFINE_integer("steps", 30, "Steps of the simulated training loop.")
flags.DEFINE_integer("per_step", 8, "Cartridges acquired per step.")
flags.DEFINE_float("compute_ms", 200.0, "Target compute time per step (jitted matmuls).")
flags.DEFINE_integer("io_threads", 1, "BudgetManager reader threads.")
flags.DEFINE_integer("repeats", 3, "Bandwidth passes per cache state; the best is kept.")
flags.DEFINE_string("workdir", None, "Where to build the store (default: a fresh temp dir).")
FLAGS = flags.FLAGS


def _prepare_cache(cache: str, paths: list[str]) -> None:
    """Drops `paths` from the page cache ("cold") or reads them once ("warm")."""
    if cache == "cold":
        drop_page_cache(paths)
    else:
        _raw_read_seconds(paths, "readinto")


def _raw_read_seconds(paths: list[str], how: str) -> float:
    import numpy as np

    t0 = time.perf_counter()
    for path in paths:
        if how == "fromfile":
            np.fromfile(path, dtype=np.uint8)
        else:
            buf = np.empty(os.path.getsize(path), np.uint8)
            with open(path, "rb", buffering=0) as f:
                f.readinto(buf)
    return time.perf_counter() - t0


def _make_workload(compute_ms: float):
    """A jitted matmul chain calibrated to take about `compute_ms`; returns a no-arg runner."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (256, 256), jnp.float32)

    @jax.jit
    def work(x, n):
        return jax.lax.fori_loop(0, n, lambda i, y: jnp.tanh(y @ x) * 0.5, x)

    work(x, 1).block_until_ready()
    t0 = time.perf_counter()
    work(x, 64).block_until_ready()
    n = max(1, round(64 * compute_ms / 1e3 / (time.perf_counter() - t0)))
    return lambda: work(x, n).block_until_ready()


def _paging_pass(store, ids, template, budget):
    """Pages every id in once; returns (bytes, read s, device_put s)."""
    from cas_jax.cartridges.budget import BudgetManager

    with BudgetManager(store, budget, opt_template=template) as manager:
        for doc_id in ids:
            manager.acquire([doc_id])
            manager.release([doc_id])
        s = manager.stats
    return s.bytes_in, s.read_s, s.device_put_s


def _training_loop(store, template, budget, schedule, run_compute, prefetch):
    import jax
    import jax.numpy as jnp

    from cas_jax.cartridges.budget import BudgetManager

    touch = jax.jit(lambda x: (x.astype(jnp.float32) + 1e-3).astype(x.dtype))
    manager = BudgetManager(store, budget, opt_template=template,
                            io_threads=FLAGS.io_threads)
    t0 = time.perf_counter()
    for t, ids in enumerate(schedule):
        pairs = manager.acquire(ids)
        if prefetch and t + 1 < len(schedule):
            manager.prefetch(schedule[t + 1])
        run_compute()
        for doc_id, (c, s) in zip(ids, pairs):
            manager.update(doc_id, *jax.tree.map(touch, (c, s)))
        manager.release(ids)
    loop_s = time.perf_counter() - t0
    manager.close()
    return loop_s, manager.stats


def main(_):
    import jax
    import ml_dtypes
    import numpy as np
    import optax

    from cas_jax.cartridges.cartridge import Cartridge, CartridgeMeta
    from cas_jax.cartridges.store import CartridgeStore, cached_opt_template

    shape = (FLAGS.layers, FLAGS.tokens, FLAGS.kv_heads, FLAGS.head_dim)
    per_cartridge = 3 * 2 * int(np.prod(shape)) * 2 + 4  # K, V, mu, nu in bf16; int32 count
    total = per_cartridge * FLAGS.num_cartridges
    budget = int(FLAGS.budget_fraction * total)
    if budget < FLAGS.per_step * per_cartridge:
        raise app.UsageError(f"a budget of {FLAGS.budget_fraction:.0%} of the store holds "
                             f"{budget // per_cartridge} cartridges, fewer than --per_step")
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="cas_paging_")
    root = os.path.join(workdir, "store")
    shutil.rmtree(root, ignore_errors=True)
    optimizer = optax.adam(1e-2)
    template = cached_opt_template(optimizer.init)
    store = CartridgeStore(root, model_fingerprint="bench")
    ids = [f"doc{i:05d}" for i in range(FLAGS.num_cartridges)]
    rng = np.random.default_rng(0)
    save_s = 0.0
    for doc_id in ids:
        kv = rng.standard_normal((2,) + shape, np.float32).astype(ml_dtypes.bfloat16)
        c = Cartridge(kv[0], kv[1], CartridgeMeta("bench", doc_id))
        opt_state = jax.tree.map(np.asarray, optimizer.init(c))
        t0 = time.perf_counter()
        store.save(doc_id, c, opt_state)
        save_s += time.perf_counter() - t0
    print(f"store: {len(ids)} cartridges {list(shape)} bf16 + Adam state, "
          f"{per_cartridge / 2**20:.2f} MiB each, {total / 2**30:.2f} GiB; saved in "
          f"{save_s:.1f} s ({total / save_s / 1e9:.2f} GB/s, {len(ids) / save_s:.0f}/s); "
          f"budget {budget / 2**20:.0f} MiB; device {jax.devices()[0].platform}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    files = live_data_files(store, ids)
    all_files = files_under(root)
    raw_bytes = sum(os.path.getsize(p) for p in files)
    rows = {}
    for cache in ("cold", "warm"):
        best = [0.0, 0.0, 0.0, 0.0]  # GB/s: raw fromfile, raw readinto, store read, paged
        for _ in range(FLAGS.repeats):  # Interleaved, best of each: the machine may be shared.
            for i, how in enumerate(("fromfile", "readinto")):
                _prepare_cache(cache, all_files)
                best[i] = max(best[i], raw_bytes / _raw_read_seconds(files, how) / 1e9)
            _prepare_cache(cache, all_files)
            nbytes, read_s, put_s = _paging_pass(store, ids, template, total)
            best[2] = max(best[2], nbytes / read_s / 1e9)
            best[3] = max(best[3], nbytes / (read_s + put_s) / 1e9)
        rows[cache] = best
    print(f"\n{'page cache':<11}{'raw fromfile':>14}{'raw readinto':>14}{'store read':>12}"
          f"{'paged (+put)':>14}{'efficiency':>12}   (GB/s, best of {FLAGS.repeats})")
    for cache, (fromfile, readinto, read, paged) in rows.items():
        print(f"{cache:<11}{fromfile:>14.2f}{readinto:>14.2f}{read:>12.2f}{paged:>14.2f}"
              f"{paged / max(fromfile, readinto):>12.2f}")

    run_compute = _make_workload(FLAGS.compute_ms)
    run_compute()
    schedule = [list(rng.choice(ids, FLAGS.per_step, replace=False))
                for _ in range(FLAGS.steps)]
    print(f"\ntraining loop: {FLAGS.steps} steps x {FLAGS.per_step} cartridges, compute "
          f"~{FLAGS.compute_ms:.0f} ms/step, budget {FLAGS.budget_fraction:.0%} of the store")
    print(f"{'prefetch':<10}{'step ms':>9}{'io wait ms':>12}{'io wait %':>11}{'hits':>6}"
          f"{'prefetched':>12}{'misses':>8}{'MB in':>8}{'MB out':>8}{'write GB/s':>12}"
          f"{'flush s':>9}")
    for prefetch in (False, True):
        drop_page_cache(files_under(root))
        loop_s, s = _training_loop(store, template, budget, schedule, run_compute, prefetch)
        print(f"{'on' if prefetch else 'off':<10}{1e3 * loop_s / FLAGS.steps:>9.1f}"
              f"{1e3 * s.acquire_wait_s / FLAGS.steps:>12.1f}"
              f"{100 * s.acquire_wait_s / loop_s:>10.1f}%{s.hits:>6}{s.prefetch_hits:>12}"
              f"{s.misses:>8}{s.bytes_in / 1e6:>8.0f}{s.bytes_written / 1e6:>8.0f}"
              f"{s.bytes_written / s.write_s / 1e9:>12.2f}{s.flush_s:>9.2f}")
    if not FLAGS.workdir:
        shutil.rmtree(workdir)
    cold_raw = max(rows["cold"][0], rows["cold"][1])
    print(f"paging_efficiency={rows['cold'][3] / cold_raw:.2f}")


if __name__ == "__main__":
    app.run(main)
