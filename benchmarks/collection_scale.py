"""Scale: the whole Factbook collection (261 documents) trained on one machine under a budget.

    python -m benchmarks.collection_scale [--steps 12] [--budget_mib 512] [--prefetch both]
        [--teacher onehot|model] [--workdir DIR] [--num_docs 0]

A SYSTEMS benchmark (paging, memory, I/O), not a quality one. It trains every document's
cartridge with `train_collection.train_collection` (real SmolLM2-135M, `loading.load_model()`,
float32) on a self-study-FORMAT dataset that is built cheaply instead of synthesised:

  Dataset. For each of the N documents, `--conversations_per_doc` conversations. Conversation i
  of a document draws a real chunk of `--chunk_tokens` tokens of the document's text (start
  seeded by (seed, doc, i)) and is [user: a question about the document's title, assistant: the
  chunk's text], tokenised with the real SmolLM2 chat template (`SelfStudy.views`, the code
  real self-study uses, so student tokens and loss_mask align exactly as in real data). Teacher
  top-k targets (k = `--topk`), per `--teacher`:
    onehot (default): next-token distillation: the true next token with log-prob 0, then k-1
      other ids with log-prob -1e9 (probability exactly 0 after renormalisation), so the
      distillation loss is the next-token cross-entropy on the assistant tokens. Used because
      a real teacher pass over 261 x 2 conversations takes tens of minutes on this 2-core
      machine under load.
    model: a real teacher forward of the model with the chunk in its system prompt
      (`SelfStudy.teacher_targets`, as real self-study computes them).
  The header line and the table say which one was used. Batch shapes are those of real data.

  Store. One cartridge of P = `--tokens_per_doc` tokens per document, initialised from its
  first P tokens with `train_collection.initialise_store` (one prefill each; called per
  document here only to print progress), float32 K/V plus per-cartridge Adam state (mu, nu of
  the P-1 trainable tokens): 30 * P * 3 * 64 * 2 * 4 B * (1 + 2 (P-1)/P) ~ 17.6 MB at P = 128,
  ~4.6 GB for 261 documents. The device budget (`--budget_mib`, default 512 MiB ~ 11%) holds
  ~29 of them; every step pins up to batch * (1 + k_max) = 16.

  Training. `train_collection` with batch 4, seq_len 128, k_max 3 distractors (schedule
  `--schedule`, default "fixed": every row sees 3 distractors, so every step pages a full bank
  of 16 cartridges, the worst case), grad scope "target", checkpoint every
  `--checkpoint_every` steps (the last step always checkpoints). With `--prefetch both`
  it runs prefetch off, then on, on the same store, each for `--steps` steps from step 0 with
  the same data order and distractor draws (the second run deletes the first's
  collection_run.json; its cartridges start from the first run's trained values, which does
  not matter here). Each run starts with the OS page cache of the store dropped (every file
  fsynced, then posix_fadvise DONTNEED): COLD. Cartridges written back during a run (evicted
  targets, to the pending store) are re-read from the page cache, i.e. warm.

Measured (on the host CPU: there the "device" is host memory, so resident cartridges, staged
prefetches and write-back copies all count in RSS):
  - total cartridge bytes (store files, and K/V+Adam bytes) vs the budget;
  - peak RSS (`ru_maxrss`, the process's maximum so far, after each phase) and the peak of
    `BudgetManager.resident_bytes` (sampled after every step's acquire and its updates);
  - paging bandwidth = bytes the manager read from the store / seconds in those reads
    (`PagingStats.bytes_read / read_s`; a read = one `readinto` of the file + CRC-32C checks),
    also with the device_put (bytes_in / (read_s + device_put_s)), against the raw read
    bandwidth of the same store's live `.bin` files read once each with plain `readinto` into
    a preallocated buffer, COLD (page cache dropped just before, like the training runs) and
    WARM (read once just before);
  - I/O wait share = seconds blocked in `BudgetManager.acquire` / step wall seconds, over the
    steady-state steps (steps 2..N: step 1 includes the XLA compile), with the checkpoint's
    flush + commit seconds (reported separately) taken out of the wall time;
  - tokens/s (valid conversation tokens) over the same steps.
The summary dict of `train_collection` has the paging totals; the per-step split comes from a
hook (`cas_jax.training.hooks`, every step): each step's tokens, loss and `PagingInfo` (the
manager's counters, resident and pinned bytes after the acquire and the updates, the ids paged
and updated, the seconds spent committing).

Last line: `scale_io_wait=X paging_efficiency=Y`: X = the I/O wait share with prefetch on (off
if only off ran); Y = the manager's read bandwidth in the prefetch-off run (reads on the
training thread, not competing with the step's compute; "on" if only on ran) over the cold raw
`readinto` bandwidth.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import shutil
import tempfile
import time

from absl import app, flags

from benchmarks.fileio import drop_page_cache, files_under, live_data_files
from cas_jax.training.distractors import SCHEDULES

flags.DEFINE_string("workdir", None, "Where the dataset and store go (default: a fresh temp dir, "
                    "deleted at the end). An existing one is reused (dataset, initialised store).")
flags.DEFINE_integer("num_docs", 0, "Documents (the first N Factbook ids); 0 = all 261.")
flags.DEFINE_integer("conversations_per_doc", 2, "Conversations per document.")
flags.DEFINE_integer("chunk_tokens", 64, "Document tokens in each assistant turn.")
flags.DEFINE_enum("teacher", "onehot", ["onehot", "model"], "Teacher top-k targets: one-hot "
                  "next-token targets, or a real teacher forward with the chunk in context.")
flags.DEFINE_integer("topk", 20, "Teacher top-k stored per target token.")
flags.DEFINE_integer("tokens_per_doc", 128, "Cartridge tokens P per document.")
flags.DEFINE_integer("budget_mib", 512, "Device budget for resident cartridges + Adam state.")
flags.DEFINE_integer("k_max", 3, "Most distractors per row.")
flags.DEFINE_enum("schedule", "fixed", SCHEDULES, "Distractor schedule.")
flags.DEFINE_integer("batch", 4, "Conversations per step.")
flags.DEFINE_integer("seq_len", 128, "Tokens per conversation row.")
flags.DEFINE_integer("steps", 12, "Steps per training run (per prefetch setting).")
flags.DEFINE_enum("prefetch", "both", ["both", "on", "off"], "Prefetch setting(s) to run.")
flags.DEFINE_integer("checkpoint_every", 50, "Steps between checkpoints (the last always is).")
flags.DEFINE_bool("drop_cache", True, "Drop the store from the OS page cache before each run.")
flags.DEFINE_integer("seed", 0, "Dataset chunks, data order, distractor draws.")
FLAGS = flags.FLAGS


def _loadavg() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS so far) of this process in MiB."""
    with open("/proc/self/status") as f:
        cur = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return cur / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _raw_read(paths: list[str]) -> tuple[int, float]:
    """Reads every file once with plain readinto into a preallocated buffer; (bytes, seconds)."""
    import numpy as np

    buf = np.empty(max(os.path.getsize(p) for p in paths), np.uint8)
    total, t0 = 0, time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            view = memoryview(buf)
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
                view = view[n:]
    return total, time.perf_counter() - t0


# ----------------------------------------------------------------------------- dataset


def build_dataset(model, docs, data_dir: str) -> dict:
    """Writes the cheap self-study-format dataset (module doc); returns facts about it."""
    import numpy as np

    from cas_jax.model import rendering
    from cas_jax.training import dataset, synthesis

    ids = list(docs)
    n_conv = FLAGS.conversations_per_doc
    run = {"benchmark": "collection_scale", "teacher": FLAGS.teacher, "topk": FLAGS.topk,
           "chunk_tokens": FLAGS.chunk_tokens, "conversations_per_doc": n_conv,
           "seed": FLAGS.seed, "model": model.fingerprint}
    per_file = 64
    items = [(d, i) for d in ids for i in range(n_conv)]
    batches = [items[j:j + per_file] for j in range(0, len(items), per_file)]
    writer = dataset.ShardWriter(data_dir, 0, 1, run=run, doc_ids=ids, num_items=len(items),
                                 num_batches=len(batches))
    if writer.complete:
        lengths = [n for f in writer.manifest["files"] for n in f["lengths"]]
        print(f"dataset: reusing {data_dir} ({len(lengths)} conversations)", flush=True)
        return {"conversations": len(lengths), "mean_len": float(np.mean(lengths)),
                "max_len": int(max(lengths)), "seconds": 0.0}
    study = synthesis.SelfStudy(model, docs, synthesis.SynthesisConfig(
        topk=FLAGS.topk, teacher_batch_size=8))
    tok = model.tokenizer
    vocab = model.config.vocab_size
    questions = ("What does the document \"{t}\" say?",
                 "Tell me something from the document about {t}.",
                 "What information does the profile of {t} give?")
    t0 = time.perf_counter()
    lengths = []
    for j in range(writer.batches_done, len(batches)):
        plans, views = [], []
        for doc_id, i in batches[j]:
            doc = docs[doc_id]
            tokens = study.doc_tokens(doc_id)
            key = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "little")
            rng = np.random.default_rng([FLAGS.seed, key, i])
            start = int(rng.integers(0, max(1, len(tokens) - FLAGS.chunk_tokens)))
            end = min(len(tokens), start + FLAGS.chunk_tokens)
            chunk = tok.decode(tokens[start:end].tolist()).strip()
            conv = [{"role": "user", "content": questions[i % len(questions)].format(t=doc.title)},
                    {"role": "assistant", "content": chunk}]
            plan = synthesis.Plan(synthesis.WorkItem(doc_id, i, key), (start, end), "synthetic",
                                  "", rendering.titled(doc.title, chunk), conv)
            plans.append(plan)
            views.append(study.views(plan))
        if FLAGS.teacher == "model":
            targets = study.teacher_targets([(t, tg) for t, tg, _, _ in views])
        else:
            targets = []
            for _, _, student, mask in views:
                nxt = student[np.flatnonzero(mask) + 1].astype(np.int64)
                tid = (nxt[:, None] + np.arange(FLAGS.topk)[None]) % vocab
                lp = np.full(tid.shape, -1e9, np.float32)
                lp[:, 0] = 0.0
                targets.append((tid.astype(np.int32), lp))
        convs = []
        for plan, (_, _, student, mask), (tid, lp) in zip(plans, views, targets):
            convs.append(dataset.Conversation(
                tokens=student, loss_mask=mask, teacher_ids=tid, teacher_logprobs=lp,
                doc_id=plan.item.doc_id, conversation_index=plan.item.conversation_index,
                chunk_start=plan.span[0], chunk_end=plan.span[1], seed_family="synthetic",
                messages=json.dumps(plan.conversation)))
            lengths.append(len(student))
        writer.write_batch(j, convs)
        print(f"  dataset: {writer.conversations_done}/{len(items)} conversations "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"conversations": len(items), "mean_len": float(np.mean(lengths)),
            "max_len": int(max(lengths)), "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- training run


@dataclasses.dataclass
class _StepLog:
    t: float
    wait: float  # cumulative acquire wait
    ckpt: float  # cumulative flush + commit seconds
    tokens: float
    loss: float


class _Observer:
    """A hook (every step) that records what `run_training` reports (module doc)."""

    def __init__(self, prefetch: bool, t_begin: float):
        self.label, self.t_begin = "on" if prefetch else "off", t_begin
        self.logs: list[_StepLog] = []
        self.peak_resident = self.peak_pinned = 0
        self.commit_s = 0.0
        self.acquired: set[str] = set()
        self.updated: set[str] = set()

    def __call__(self, info) -> None:
        now, p = time.perf_counter(), info.paging
        s = p.stats
        self.peak_resident = max(self.peak_resident, p.peak_resident_bytes)
        self.peak_pinned = max(self.peak_pinned, p.pinned_bytes)
        self.acquired.update(p.acquired)
        self.updated.update(p.updated)
        self.commit_s = p.commit_s
        prev = self.logs[-1] if self.logs else _StepLog(self.t_begin, 0.0, 0.0, 0, 0.0)
        self.logs.append(_StepLog(now, s.acquire_wait_s, s.flush_s + p.commit_s, info.tokens,
                                  info.loss))
        print(f"  [{self.label}] step {info.step}/{info.total_steps} loss {info.loss:.3f} "
              f"{now - prev.t:.1f} s io-wait {1e3 * (s.acquire_wait_s - prev.wait):.0f} ms "
              f"resident {p.peak_resident_bytes / 2**20:.0f} MiB hits "
              f"{s.hits + s.prefetch_hits} misses {s.misses} evictions {s.evictions} "
              f"load {_loadavg()}", flush=True)


def run_training(model, data_dir: str, store_dir: str, prefetch: bool) -> dict:
    from cas_jax.training import train, train_collection as tc_lib
    from cas_jax.training.distractors import DistractorSchedule
    from cas_jax.training.hooks import Hooks

    run_path = os.path.join(store_dir, tc_lib.RUN_STATE)
    if os.path.exists(run_path):  # Restart from step 0 (the data order repeats exactly).
        os.remove(run_path)
    if FLAGS.drop_cache:
        drop_page_cache(files_under(store_dir))
    cfg = tc_lib.CollectionConfig(
        tokens_per_doc=FLAGS.tokens_per_doc, batch_size=FLAGS.batch, seq_len=FLAGS.seq_len,
        steps=FLAGS.steps, distractors=DistractorSchedule(FLAGS.k_max, FLAGS.schedule),
        grad_scope="target", budget_bytes=FLAGS.budget_mib << 20,
        checkpoint_every=FLAGS.checkpoint_every, prefetch=prefetch, seed=FLAGS.seed)
    tcfg = train.TrainConfig(total_steps=FLAGS.steps)
    t_begin = time.perf_counter()
    obs = _Observer(prefetch, t_begin)
    hooks = Hooks()
    hooks.add_hook(obs, every=1)
    summary = tc_lib.train_collection(model, data_dir, store_dir, cfg, tcfg, hooks=hooks)
    logs = obs.logs
    steady = logs[1:]  # Step 1 includes the compile.
    wall = sum(b.t - a.t for a, b in zip(logs, steady))
    ckpt = sum(b.ckpt - a.ckpt for a, b in zip(logs, steady))
    wait = sum(b.wait - a.wait for a, b in zip(logs, steady))
    tokens = sum(s.tokens for s in steady)
    return {"prefetch": prefetch, "summary": summary, "stats": summary["paging"],
            "steady_steps": len(steady), "steady_wall_s": wall - ckpt, "ckpt_s": ckpt,
            "first_step_s": logs[0].t - t_begin, "steady_wait_s": wait,
            "io_wait_share": wait / max(wall - ckpt, 1e-9),
            "tokens_per_s": tokens / max(wall - ckpt, 1e-9),
            "peak_resident": obs.peak_resident, "peak_pinned": obs.peak_pinned,
            "distinct_paged": len(obs.acquired), "distinct_updated": len(obs.updated),
            "commit_s": obs.commit_s, "rss": _rss_mib(), "final_loss": logs[-1].loss}


# ----------------------------------------------------------------------------- main


def main(_):
    import jax

    from cas_jax.cartridges.store import CartridgeStore
    from cas_jax.documents import corpus
    from cas_jax.model import loading
    from cas_jax.training import train, train_collection as tc_lib

    t_all = time.perf_counter()
    print(f"collection_scale: load average {_loadavg()} on {os.cpu_count()} CPUs; "
          f"device {jax.devices()[0].platform}; teacher={FLAGS.teacher}", flush=True)
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="cas_scale_")
    os.makedirs(workdir, exist_ok=True)
    data_dir, store_dir = os.path.join(workdir, "data"), os.path.join(workdir, "store")

    t0 = time.perf_counter()
    model = loading.load_model()
    print(f"model: SmolLM2-135M-Instruct float32 loaded in {time.perf_counter() - t0:.0f} s; "
          f"RSS {_rss_mib()[0]:.0f} MiB", flush=True)
    docs = corpus.load_factbook()
    if FLAGS.num_docs:
        docs = docs.subset(docs.ids[:FLAGS.num_docs])
    data = build_dataset(model, docs, data_dir)
    print(f"dataset: {data['conversations']} conversations over {len(docs)} documents, "
          f"{data['mean_len']:.0f} tokens on average (max {data['max_len']}, seq_len "
          f"{FLAGS.seq_len}), teacher={FLAGS.teacher}, built in {data['seconds']:.0f} s",
          flush=True)

    # Initialise every cartridge exactly as train_collection would (its initialise_store), one
    # document at a time so that progress can be printed.
    optimizer = train.make_optimizer(train.TrainConfig(total_steps=FLAGS.steps))
    os.makedirs(store_dir, exist_ok=True)
    main_store = CartridgeStore(os.path.join(store_dir, "cartridges"), model.fingerprint)
    texts = docs.texts
    t0 = time.perf_counter()
    todo = [d for d in docs if not main_store.exists(d)]
    for n, doc_id in enumerate(todo, 1):
        tc_lib.initialise_store(main_store, model, {doc_id: texts[doc_id]},
                                FLAGS.tokens_per_doc, optimizer)
        if n % 25 == 0 or n == len(todo):
            dt = time.perf_counter() - t0
            print(f"  init: {n}/{len(todo)} cartridges, {dt:.0f} s ({dt / n:.2f} s each), "
                  f"load {_loadavg()}", flush=True)
    init_s = time.perf_counter() - t0
    files = live_data_files(main_store)
    file_bytes = sum(os.path.getsize(p) for p in files)
    c, o, _ = main_store.load(main_store.list()[0], tc_lib.opt_template_fn(optimizer))
    per_cart = c.nbytes + sum(x.nbytes for x in jax.tree.leaves(o))
    total = per_cart * len(files)
    budget = FLAGS.budget_mib << 20
    print(f"store: {len(files)} cartridges [30, {FLAGS.tokens_per_doc}, 3, 64] float32 + Adam, "
          f"{per_cart / 1e6:.1f} MB each ({c.nbytes / 1e6:.1f} MB K/V), {total / 2**30:.2f} GiB "
          f"in all ({file_bytes / 2**30:.2f} GiB of data files); budget {budget / 2**20:.0f} MiB "
          f"= {budget / total:.1%} of it, {budget // per_cart} cartridges; initialised in "
          f"{init_s:.0f} s; RSS {_rss_mib()[0]:.0f} MiB", flush=True)

    # Raw read bandwidth of the same files: cold (dropped, as each training run starts) and warm.
    raw = {}
    for cache in ("cold", "warm"):
        if cache == "cold":
            drop_page_cache(files_under(store_dir))
        else:
            _raw_read(files)
        nbytes, sec = _raw_read(files)
        raw[cache] = nbytes / sec / 1e9
    print(f"raw readinto of the {len(files)} live data files: cold {raw['cold']:.2f} GB/s, "
          f"warm {raw['warm']:.2f} GB/s", flush=True)

    rss_before = _rss_mib()
    runs = []
    for prefetch in {"both": (False, True), "on": (True,), "off": (False,)}[FLAGS.prefetch]:
        print(f"training: prefetch {'on' if prefetch else 'off'}, {FLAGS.steps} steps, batch "
              f"{FLAGS.batch} x {FLAGS.seq_len}, k_max {FLAGS.k_max} ({FLAGS.schedule}), "
              f"page cache {'dropped' if FLAGS.drop_cache else 'as is'}; load {_loadavg()}",
              flush=True)
        runs.append(run_training(model, data_dir, store_dir, prefetch))

    print(f"\n## collection_scale ({len(files)} Factbook documents, SmolLM2-135M f32, "
          f"teacher={FLAGS.teacher}, {jax.devices()[0].platform}, load average {_loadavg()} "
          f"on {os.cpu_count()} CPUs)\n")
    print("| quantity | value |\n|---|---|")
    print(f"| cartridges (P={FLAGS.tokens_per_doc}, f32 K/V + Adam) | {len(files)} x "
          f"{per_cart / 2**20:.1f} MiB = {total / 2**30:.2f} GiB |")
    print(f"| device budget | {budget / 2**20:.0f} MiB ({budget / total:.1%} of all cartridges, "
          f"{budget // per_cart} cartridges; a step pins up to "
          f"{FLAGS.batch * (1 + FLAGS.k_max)}) |")
    print("| peak resident cartridge bytes | "
          + ", ".join(f"{r['peak_resident'] / 2**20:.0f} MiB (prefetch "
                      f"{'on' if r['prefetch'] else 'off'})" for r in runs) + " |")
    print(f"| peak RSS (ru_maxrss) | {rss_before[1]:.0f} MiB before training; "
          + ", ".join(f"{r['rss'][1]:.0f} MiB after prefetch {'on' if r['prefetch'] else 'off'}"
                      for r in runs) + " |")
    print(f"| raw readinto, same files | cold {raw['cold']:.2f} GB/s, warm {raw['warm']:.2f} "
          f"GB/s |")
    print(f"| dataset | {data['conversations']} conversations, teacher={FLAGS.teacher} |")
    print(f"| cartridge init (one prefill + save each) | {init_s:.0f} s |")

    print("\n| prefetch | steps (steady) | first step s | step s | io wait s/step | io wait "
          "share | tok/s | hits | prefetched | misses | evictions | distinct paged/updated | "
          "GB read | read GB/s | paged (read+put) GB/s | efficiency vs cold raw | GB written | "
          "write GB/s | checkpoint s (commit) | final loss |")
    print("|" + "---|" * 20)
    for r in runs:
        s, n = r["stats"], max(r["steady_steps"], 1)
        read_bw = s["bytes_read"] / max(s["read_s"], 1e-9) / 1e9
        paged_bw = s["bytes_in"] / max(s["read_s"] + s["device_put_s"], 1e-9) / 1e9
        r["read_bw"] = read_bw
        print(f"| {'on' if r['prefetch'] else 'off'} | {r['summary']['steps']} "
              f"({r['steady_steps']}) | {r['first_step_s']:.1f} | {r['steady_wall_s'] / n:.2f} | "
              f"{r['steady_wait_s'] / n:.2f} | {r['io_wait_share']:.1%} | "
              f"{r['tokens_per_s']:.1f} | {s['hits']} | {s['prefetch_hits']} | {s['misses']} | "
              f"{s['evictions']} | {r['distinct_paged']}/{r['distinct_updated']} | "
              f"{s['bytes_read'] / 1e9:.2f} | {read_bw:.2f} | {paged_bw:.2f} | "
              f"{read_bw / raw['cold']:.2f} | {s['bytes_written'] / 1e9:.2f} | "
              f"{s['bytes_written'] / max(s['write_s'], 1e-9) / 1e9:.2f} | {r['ckpt_s']:.1f} "
              f"({r['commit_s']:.1f}) | "
              f"{r['final_loss']:.3f} |")
    print("\nio wait share = seconds blocked in BudgetManager.acquire / wall seconds of steps "
          "2..N less checkpoint (flush + commit) seconds; read GB/s = PagingStats.bytes_read / "
          "read_s (store reads incl. CRC-32C; each run starts with the page cache dropped, "
          "re-reads of cartridges written back during the run are warm); raw = plain readinto "
          "of the same live .bin files.")
    for r in runs:
        print(f"train_collection summary (prefetch {'on' if r['prefetch'] else 'off'}): "
              f"{json.dumps(r['summary'])}")
    print(f"total wall {time.perf_counter() - t_all:.0f} s; load average {_loadavg()}")
    if not FLAGS.workdir:
        shutil.rmtree(workdir)
    by = {r["prefetch"]: r for r in runs}
    io_run = by.get(True, by.get(False))
    bw_run = by.get(False, by.get(True))
    print(f"scale_io_wait={io_run['io_wait_share']:.3f} "
          f"paging_efficiency={bw_run['read_bw'] / raw['cold']:.2f}")


if __name__ == "__main__":
    app.run(main)
