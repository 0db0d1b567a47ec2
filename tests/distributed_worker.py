"""One process of the multi-process tests (`test_distributed.py` starts it N times).

  python tests/distributed_worker.py --job=train|collection|synthesis --data=DIR --out=DIR \
      [--coordinator=HOST:PORT --num_processes=N --process_id=I]

It runs the library's own multi-process paths with a tiny random model: `train.train` on a
self-study dataset (each process reading its rows of every global batch), `train_collection`
over a store with paging, or `synthesis.run_shard` with the shard of its process. Process 0
writes the result to --out (train: result.npz with per-step losses and the cartridge).
--step_delay_s slows every reported step, so that a test can kill a process mid-run.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from cas_jax import distributed  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The worker's flags, defined only when it runs as a script: test_distributed imports this
    module for its helpers, and flags defined on import would clash with launchers' (--out)."""
    flags.DEFINE_enum("job", None, ["train", "collection", "synthesis"], "What to run.")
    flags.DEFINE_string("data", None, "Self-study dataset folder (read; written by synthesis).")
    flags.DEFINE_string("out", None, "Output folder.")
    flags.DEFINE_integer("steps", 6, "Training steps.")
    flags.DEFINE_float("step_delay_s", 0.0, "Sleep after every reported step.")
    flags.DEFINE_integer("fail_process", -1, "This process exits with code 3 at once; the "
                         "others wait at a barrier it never reaches.")
    flags.DEFINE_integer("hang_process", -1, "This process sleeps for an hour at once; the "
                         "others wait at a barrier it does not reach.")
    distributed.define_flags()

DOCS = ("a", "b", "c", "d", "e")
P = 6


def tiny_config():
    from cas_jax.model.config import ModelConfig
    return ModelConfig(model_type="llama", vocab_size=61, hidden_size=32, intermediate_size=48,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                       max_position_embeddings=512)


def write_dataset(path: str, n: int = 40, seed: int = 0) -> None:
    """n random conversations over DOCS (teacher top-3 distributions), one shard."""
    import numpy as np

    from cas_jax.training import dataset
    cfg, rng = tiny_config(), np.random.default_rng(seed)
    convs = []
    for i in range(n):
        length = int(rng.integers(8, 14))
        mask = np.zeros(length, bool)
        mask[length - 5:length - 1] = True
        ids = rng.integers(0, cfg.vocab_size, size=(4, 3)).astype(np.int32)
        lp = np.log(np.sort(rng.dirichlet(np.ones(3), size=4), axis=1)[:, ::-1])
        convs.append(dataset.Conversation(
            tokens=rng.integers(0, cfg.vocab_size, length).astype(np.int32), loss_mask=mask,
            teacher_ids=ids, teacher_logprobs=np.ascontiguousarray(lp, np.float32),
            doc_id=DOCS[i % len(DOCS)], conversation_index=i, chunk_start=0,
            chunk_end=length, seed_family="question", messages="[]"))
    w = dataset.ShardWriter(path, 0, 1, run={"t": 1}, doc_ids=DOCS, num_items=n, num_batches=1)
    w.write_batch(0, convs)


def _model():
    import jax

    from cas_jax.model import llama as model_lib
    from cas_jax.model.loading import LoadedModel
    cfg = tiny_config()
    params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map_with_path(  # scaled up: outputs depend on the cartridge
        lambda p, x: x if "norm" in jax.tree_util.keystr(p) else 4 * x, params)
    return LoadedModel(cfg, params, None, "tiny-model", "")


def init_store(root: str) -> None:
    """A store under `root` (train_collection's layout) with a random cartridge per doc."""
    import jax

    from cas_jax.cartridges import cartridge as cart_lib
    from cas_jax.cartridges.store import CartridgeStore
    from cas_jax.training import train, train_collection as tc
    model = _model()
    store = CartridgeStore(os.path.join(root, "cartridges"), model.fingerprint)
    opt = train.make_optimizer(train.TrainConfig(lr=5e-2))
    for i, d in enumerate(DOCS):
        c = jax.device_get(cart_lib.init_random_tokens(
            model.config, model.params, P, jax.random.PRNGKey(i), fingerprint=model.fingerprint,
            doc_id=d))
        store.save(d, c, jax.device_get(opt.init(tc.single_parts(c))), step=0)


def _pace(_report) -> None:
    elapsed = getattr(_report, "elapsed_s", None)
    print(f"reported step {_report.step}" + (f" elapsed {elapsed:.3f}" if elapsed else ""),
          flush=True)
    time.sleep(FLAGS.step_delay_s)


def run_train() -> None:
    import jax
    import numpy as np

    from cas_jax.cartridges import cartridge as cart_lib
    from cas_jax.training import dataset, train
    model = _model()
    tcfg = train.TrainConfig(lr=0.05, logits_chunk=8)
    c = cart_lib.init_random_tokens(model.config, model.params, P, jax.random.PRNGKey(1),
                                    fingerprint="fp")
    data = dataset.make_train_iterator(FLAGS.data, 8, 16, seed=3, num_epochs=None,
                                       drop_remainder=True)
    losses = []

    def report(r):
        losses.append(r.loss)
        _pace(r)

    state = train.train(train.init_train_state([c], tcfg), model.params, data,
                        config=model.config, train_config=tcfg, mesh=train.make_mesh(),
                        num_steps=FLAGS.steps, log_every=1, on_report=report, save_every=2,
                        checkpoint_dir=os.path.join(FLAGS.out, "checkpoints"))
    (after,) = train.cartridges_from_state(state, [c.meta])
    if distributed.is_primary():
        np.savez(os.path.join(FLAGS.out, "result.npz"), losses=np.asarray(losses),
                 keys=after.keys, values=after.values, devices=len(jax.devices()),
                 processes=jax.process_count())


def run_collection() -> None:
    import jax

    from cas_jax.training import train, train_collection as tc
    from cas_jax.training.distractors import DistractorSchedule
    model = _model()
    tcfg = train.TrainConfig(lr=5e-2)
    cfg = model.config
    per = 3 * 2 * cfg.num_layers * P * cfg.num_kv_heads * cfg.head_dim * 4  # K/V + Adam
    ccfg = tc.CollectionConfig(tokens_per_doc=P, batch_size=4, seq_len=16, steps=FLAGS.steps,
                               distractors=DistractorSchedule(2, "uniform"),
                               budget_bytes=int(per * 13.5), checkpoint_every=3, log_every=1)
    summary = tc.train_collection(model, FLAGS.data, FLAGS.out, ccfg, tcfg, on_report=_pace)
    print(f"done {summary['steps']} steps, {jax.process_count()} processes", flush=True)


def run_synthesis() -> None:
    import jax

    from cas_jax.documents.corpus import Document
    from cas_jax.model import llama as model_lib, loading, tokenizer as tok_lib
    from cas_jax.model.config import ModelConfig
    from cas_jax.training import synthesis
    tok = tok_lib.load_tokenizer(loading.default_model_path())
    config = ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=32,
                         intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=8, max_position_embeddings=2048)
    params = model_lib.init_params(config, jax.random.PRNGKey(0))
    model = loading.LoadedModel(config, params, tok, "tiny-test", "")
    docs = {f"doc{i}": Document(f"doc{i}", f"Report {i}", " ".join(
        f"Item {j} of report {i} has value {7 * i + j}." for j in range(30))) for i in range(2)}
    study = synthesis.SelfStudy(model, docs, synthesis.SynthesisConfig(
        chunk_min=16, chunk_max=32, max_user_tokens=6, max_answer_tokens=10, topk=5))
    items = synthesis.work_items(sorted(docs), 4, seed=0)
    synthesis.run_shard(study, items, FLAGS.data, batch_size=2,
                        shard_index=jax.process_index(), shard_count=jax.process_count())


def main(argv):
    del argv
    distributed.initialize_from_flags()
    if FLAGS.fail_process >= 0:
        import jax
        if jax.process_index() == FLAGS.fail_process:
            sys.exit(3)
        distributed.barrier("never-reached")
    if FLAGS.hang_process >= 0:
        import jax
        if jax.process_index() == FLAGS.hang_process:
            time.sleep(3600)
        distributed.barrier("not-reached-in-time")
    if FLAGS.out:
        os.makedirs(FLAGS.out, exist_ok=True)
    {"train": run_train, "collection": run_collection, "synthesis": run_synthesis}[FLAGS.job]()
    distributed.barrier("worker-done")


if __name__ == "__main__":
    define_flags()
    app.run(main)
