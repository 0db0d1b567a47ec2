"""Shared fixtures and factories.

  smollm             the real embedded model, loaded once per test session
  tokenizer          the real SmolLM2 tokenizer, loaded once per test session
  tiny_config()      the tests' tiny random Llama config (2 layers, hidden 32, 4 heads, 2 KV
                     heads, head dim 8; the real tokenizer's vocabulary unless `vocab_size`
                     is given); keyword overrides change any other field
  tiny_model()       that config with random params (PRNGKey(0)) and the real tokenizer, as a
                     LoadedModel
  tiny               the fixture of `tiny_model()`, one per test module
  make_cartridge()   a random Cartridge of a given size, dtype and shape
  cartridge_prefix() one cartridge as a model prefix (`model.forward`'s `prefix`), batch 1
  FICTION            six short documents about made-up countries (ids zo, ve, ta, pl, qu, ri)

Test modules import the factories with `from conftest import ...` (tests/ is on sys.path).
"""

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

TINY_FINGERPRINT = "tiny-test"


def _fiction():
    from cas_jax.documents.corpus import Collection, Document
    return Collection([
        Document("zo", "Zorbania", "Zorbania is a small republic. The capital of Zorbania is "
                 "Quillton. Its national animal is the marsh heron."),
        Document("ve", "Vexland", "Vexland is an island kingdom. The highest point of Vexland "
                 "is Mount Brel, and its currency is the vex crown."),
        Document("ta", "Tarmesh", "Tarmesh is a desert federation whose largest river is the "
                 "Olun."),
        Document("pl", "Plimb", "Plimb exports copper and tin; its capital is Harrowgate."),
        Document("qu", "Quor", "Quor is a mountain state with a cold climate and no coast."),
        Document("ri", "Rell", "Rell is a lowland country of canals, tulips and windmills."),
    ])


FICTION = _fiction()
CARTRIDGE_FINGERPRINT = "tiny-fp"
CARTRIDGE_SHAPE = (3, 2, 4)  # layers, kv heads, head dim


@functools.cache
def real_tokenizer():
    """The embedded model's tokenizer (loaded once per process)."""
    from cas_jax.model import loading, tokenizer as tok_lib

    return tok_lib.load_tokenizer(loading.default_model_path())


def tiny_config(vocab_size: int | None = None, **overrides):
    """The tiny random Llama's ModelConfig; `vocab_size` None: the real tokenizer's."""
    from cas_jax.model.config import ModelConfig

    fields = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=2048)
    return ModelConfig(vocab_size=len(real_tokenizer()) if vocab_size is None else vocab_size,
                       **{**fields, **overrides})


def tiny_model(fingerprint: str = TINY_FINGERPRINT, path: str = "", **overrides):
    """`tiny_config(**overrides)` with params from PRNGKey(0) and the real tokenizer."""
    from cas_jax.model import llama as model_lib, loading

    config = tiny_config(**overrides)
    params = model_lib.init_params(config, jax.random.PRNGKey(0))
    return loading.LoadedModel(config, params, real_tokenizer(), fingerprint, path)


def make_cartridge(p=16, dtype=np.float32, num_frozen=1, doc_id="doc", seed=0,
                   shape=CARTRIDGE_SHAPE, fingerprint=CARTRIDGE_FINGERPRINT):
    """A cartridge of `p` tokens of standard normal K and V ([layers, p, kv heads, head dim]
    from `shape`) in `dtype`, seeded, its first `num_frozen` tokens frozen."""
    from cas_jax.cartridges.cartridge import Cartridge, CartridgeMeta

    rng = np.random.default_rng(seed)
    layers, heads, head_dim = shape
    return Cartridge(keys=rng.standard_normal((layers, p, heads, head_dim)).astype(dtype),
                     values=rng.standard_normal((layers, p, heads, head_dim)).astype(dtype),
                     meta=CartridgeMeta(fingerprint, doc_id, num_frozen, "first_tokens"))


def write_conversations(path, doc_ids, vocab_size: int, rng: np.random.Generator, k: int = 3,
                        count: int = 24, messages=lambda doc, i: "[]",
                        seed_family: str = "question") -> str:
    """A one-shard self-study dataset at `path`: `count` conversations of 8-13 random tokens,
    the i-th about doc_ids[i % n] (its messages JSON `messages(doc, i)`), each with 4 masked
    positions and a random teacher top-k of width k. Returns the path."""
    from cas_jax.training import dataset

    convs = []
    for i in range(count):
        doc = doc_ids[i % len(doc_ids)]
        n = int(rng.integers(8, 14))
        mask = np.zeros(n, bool)
        mask[n - 5:n - 1] = True
        ids = rng.integers(0, vocab_size, size=(4, k)).astype(np.int32)
        lp = np.log(np.sort(rng.dirichlet(np.ones(k), size=4), axis=1)[:, ::-1])
        convs.append(dataset.Conversation(
            tokens=rng.integers(0, vocab_size, n).astype(np.int32), loss_mask=mask,
            teacher_ids=ids, teacher_logprobs=np.ascontiguousarray(lp.astype(np.float32)),
            doc_id=doc, conversation_index=i, chunk_start=0, chunk_end=n,
            seed_family=seed_family, messages=messages(doc, i)))
    w = dataset.ShardWriter(str(path), 0, 1, run={"t": 1}, doc_ids=list(doc_ids),
                            num_items=count, num_batches=1)
    w.write_batch(0, convs)
    return str(path)


def assert_bitwise_equal(a, b):
    """Two cartridges hold the same bytes, dtype and shape, and freeze as many tokens."""
    for x, y in ((a.keys, b.keys), (a.values, b.values)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
    assert a.meta.num_frozen == b.meta.num_frozen


def cartridge_prefix(cartridge) -> dict:
    """One cartridge as the prefix of a batch of one row, every token visible."""
    return {"k": jnp.asarray(cartridge.keys)[:, None], "v": jnp.asarray(cartridge.values)[:, None],
            "mask": jnp.ones((1, cartridge.num_tokens), bool)}


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct (f32) as a LoadedModel."""
    from cas_jax.model.loading import load_model

    return load_model()


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer."""
    return real_tokenizer()


@pytest.fixture(scope="module")
def tiny():
    """`tiny_model()`: the tiny random Llama with the real tokenizer."""
    return tiny_model()
