"""BudgetManager: the budget holds under random access, paging is bitwise, write-back lands."""

import os
import random
import threading

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from cas_jax.cartridges.budget import BudgetExceededError, BudgetManager
from cas_jax.cartridges.cartridge import Cartridge, CartridgeMeta
from cas_jax.cartridges.store import CartridgeStore, CorruptCartridgeError, cached_opt_template

FP = "model-a"
SHAPE = (2, 4, 1, 8)  # [layers, tokens, kv_heads, head_dim]
OPTIMIZER = optax.adam(1e-2)
opt_template = cached_opt_template(OPTIMIZER.init)


def make_cartridge(doc_id: str, seed: int) -> Cartridge:
    rng = np.random.default_rng(seed)
    return Cartridge(keys=rng.standard_normal(SHAPE).astype(ml_dtypes.bfloat16),
                     values=rng.standard_normal(SHAPE).astype(ml_dtypes.bfloat16),
                     meta=CartridgeMeta(model_fingerprint=FP, doc_id=doc_id))


def entry_nbytes() -> int:
    c = make_cartridge("x", 0)
    return c.nbytes + sum(x.nbytes for x in jax.tree.leaves(OPTIMIZER.init(c)))


def as_bytes(tree) -> list[bytes]:
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


@jax.jit
def _perturb(x):
    return (x.astype(jnp.float32) * 1.5 + 0.25).astype(x.dtype)


def train_step(cartridge, opt_state):
    """A stand-in update that changes every leaf bitwise. (Jitting over the Cartridge itself
    would compile once per document: its meta, doc_id included, is static.)"""
    return jax.tree.map(_perturb, (cartridge, opt_state))


def fill_store(root: str, n: int) -> CartridgeStore:
    store = CartridgeStore(root, model_fingerprint=FP)
    for i in range(n):
        c = make_cartridge(f"doc{i}", i)
        store.save(f"doc{i}", c, OPTIMIZER.init(c), step=0)
    return store


@pytest.fixture
def store(tmp_path):
    return fill_store(str(tmp_path / "store"), 12)


def test_random_access_never_exceeds_budget_and_write_back_is_exact(tmp_path):
    n, per_step = 500, 4
    store = fill_store(str(tmp_path / "store"), n)
    budget = 24 * entry_nbytes()
    rng = random.Random(0)
    expected = {}  # doc_id -> (bytes of cartridge and opt state, step) after our updates
    with BudgetManager(store, budget, opt_template=opt_template,
                       max_pending_write_bytes=4 * entry_nbytes()) as manager:
        next_ids = rng.sample(range(n), per_step)
        for _ in range(150):
            ids = [f"doc{i}" for i in next_ids]
            pairs = manager.acquire(ids)
            assert manager.resident_bytes <= budget
            next_ids = rng.sample(range(n), per_step)
            if rng.random() < 0.7:
                manager.prefetch(f"doc{i}" for i in next_ids)
            for doc_id, (c, s) in zip(ids, pairs):
                if doc_id in expected:  # Reloaded (possibly after eviction) bitwise as updated.
                    assert as_bytes((c, s)) == expected[doc_id][0]
                if rng.random() < 0.6:
                    c, s = train_step(c, s)
                    manager.update(doc_id, c, s)
                    expected[doc_id] = (as_bytes((c, s)), expected.get(doc_id, (0, 0))[1] + 1)
                    assert manager.resident_bytes <= budget
            manager.release(ids)
            assert manager.resident_bytes <= budget
            assert set(manager.resident_ids()) <= {f"doc{i}" for i in range(n)}
        stats = manager.stats
    assert stats.evictions > 0 and stats.bytes_written > 0 and stats.prefetch_hits > 0
    reopened = CartridgeStore(store.root, model_fingerprint=FP)
    for doc_id, (data, step) in expected.items():
        c, s, stored_step = reopened.load(doc_id, opt_template=opt_template)
        assert as_bytes((c, s)) == data and stored_step == step


def test_evicted_dirty_cartridge_reloads_bitwise_and_is_written_back(store):
    budget = 2 * entry_nbytes()
    manager = BudgetManager(store, budget, opt_template=opt_template)
    [(c, s)] = manager.acquire(["doc0"])
    c, s = train_step(c, s)
    manager.update("doc0", c, s, step=5)
    updated = as_bytes((c, s))
    manager.release(["doc0"])
    for doc_id in ["doc1", "doc2", "doc3"]:
        manager.acquire([doc_id])
        manager.release([doc_id])
        assert manager.resident_bytes <= budget
    assert "doc0" not in manager.resident_ids()
    [(c2, s2)] = manager.acquire(["doc0"])
    assert as_bytes((c2, s2)) == updated
    manager.release(["doc0"])
    manager.close()
    c3, s3, step = CartridgeStore(store.root).load("doc0", opt_template=opt_template)
    assert as_bytes((c3, s3)) == updated and step == 5
    # The clean cartridges were never rewritten.
    assert sorted(os.listdir(store.cartridge_dir("doc1"))) == [
        "CURRENT", "v00000001.bin", "v00000001.json"]


def test_reacquire_during_write_back_is_served_from_the_host_copy(store, monkeypatch):
    gate = threading.Event()
    save = store.save

    def held_save(*args, **kwargs):
        gate.wait()
        save(*args, **kwargs)

    monkeypatch.setattr(store, "save", held_save)
    manager = BudgetManager(store, entry_nbytes(), opt_template=opt_template)
    [(c, s)] = manager.acquire(["doc0"])
    c, s = train_step(c, s)
    manager.update("doc0", c, s)
    updated = as_bytes((c, s))
    manager.release(["doc0"])
    manager.acquire(["doc1"])  # Evicts dirty doc0, whose write waits at the gate.
    assert manager.resident_bytes <= entry_nbytes()
    manager.release(["doc1"])
    [(c, s)] = manager.acquire(["doc0"])
    assert as_bytes((c, s)) == updated
    assert manager.stats.bytes_read == 2 * entry_nbytes()  # doc0 was not read from the store.
    gate.set()
    manager.release(["doc0"])
    manager.close()
    assert as_bytes(store.load("doc0", opt_template=opt_template)[:2]) == updated


def test_flush_writes_dirty_resident_cartridges(store):
    manager = BudgetManager(store, 10 * entry_nbytes(), opt_template=opt_template)
    pairs = manager.acquire(["doc0", "doc1"])
    new = [train_step(c, s) for c, s in pairs]
    for doc_id, (c, s) in zip(["doc0", "doc1"], new):
        manager.update(doc_id, c, s)
    manager.flush()
    reopened = CartridgeStore(store.root)
    for doc_id, (c, s) in zip(["doc0", "doc1"], new):
        loaded = reopened.load(doc_id, opt_template=opt_template)
        assert as_bytes(loaded[:2]) == as_bytes((c, s)) and loaded[2] == 1
    assert manager.stats.bytes_written == 2 * entry_nbytes()
    manager.flush()  # Nothing dirty any more: nothing written.
    assert manager.stats.bytes_written == 2 * entry_nbytes()


def test_pinned_cartridges_are_never_evicted(store):
    budget = 3 * entry_nbytes()
    manager = BudgetManager(store, budget, opt_template=opt_template)
    [(pinned_c, _)] = manager.acquire(["doc0"])
    for i in range(1, 12):
        manager.acquire([f"doc{i}"])
        assert "doc0" in manager.resident_ids() and manager.resident_bytes <= budget
        manager.release([f"doc{i}"])
    np.asarray(pinned_c.keys)  # Still a live device array.
    assert manager.stats.evictions >= 8


def test_pinned_set_over_budget_raises_and_takes_no_pins(store):
    manager = BudgetManager(store, 3 * entry_nbytes(), opt_template=opt_template)
    manager.acquire(["doc0", "doc1"])
    with pytest.raises(BudgetExceededError, match="doc2.*doc3.*budget"):
        manager.acquire(["doc1", "doc2", "doc3"])
    manager.release(["doc0", "doc1"])  # doc1 was pinned once, not twice.
    with pytest.raises(ValueError, match="not acquired"):
        manager.release(["doc1"])
    manager.acquire(["doc2", "doc3", "doc4"])
    assert manager.resident_bytes <= 3 * entry_nbytes()


def test_prefetch_makes_acquire_a_prefetch_hit(store):
    manager = BudgetManager(store, 10 * entry_nbytes(), opt_template=opt_template)
    manager.prefetch(["doc3", "doc4"])
    manager._staged["doc3"].result()  # Let the background read finish.
    pairs = manager.acquire(["doc3", "doc4"])
    stats = manager.stats
    assert (stats.prefetch_hits, stats.misses, stats.hits) == (2, 0, 0)
    assert stats.bytes_read == 2 * entry_nbytes()
    c3, s3, _ = store.load("doc3", opt_template=opt_template)
    assert as_bytes(pairs[0]) == as_bytes((c3, s3))
    manager.release(["doc3", "doc4"])
    manager.acquire(["doc3"])
    assert manager.stats.hits == 1
    # A new prefetch request replaces the old one; resident ids are not read again.
    manager.prefetch(["doc3", "doc5"])
    assert list(manager._staged) == ["doc5"]


def test_corrupt_cartridge_fails_acquire_by_name_and_the_rest_works(store):
    path = os.path.join(store.cartridge_dir("doc2"), "v00000001.bin")
    with open(path, "r+b") as f:
        f.write(b"\x00\x01\x02")
    manager = BudgetManager(store, 10 * entry_nbytes(), opt_template=opt_template)
    manager.prefetch(["doc1", "doc2"])
    with pytest.raises(CorruptCartridgeError, match=f"'doc2'.*{path}"):
        manager.acquire(["doc1", "doc2"])
    assert manager.pinned_bytes == 0
    assert len(manager.acquire(["doc1", "doc3"])) == 2


def test_update_and_write_back_errors(store, monkeypatch):
    manager = BudgetManager(store, 10 * entry_nbytes(), opt_template=opt_template)
    c = make_cartridge("doc0", 0)
    with pytest.raises(ValueError, match="'doc0' is not acquired"):
        manager.update("doc0", c, OPTIMIZER.init(c))
    [(c, s)] = manager.acquire(["doc0"])
    manager.update("doc0", *train_step(c, s))

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        manager.flush()


def test_without_opt_template_pages_cartridges_alone_with_sharding(store):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    manager = BudgetManager(store, 2 * make_cartridge("x", 0).nbytes, sharding=sharding)
    pairs = manager.acquire(["doc0", "doc1"])
    assert [s for _, s in pairs] == [None, None]
    assert as_bytes(pairs[1][0]) == as_bytes(make_cartridge("doc1", 1))
    assert pairs[0][0].keys.sharding == sharding


def test_both_stores_are_backing_stores_and_the_manager_pages_through_a_pending_one(tmp_path):
    """BudgetManager's store interface (`store.BackingStore`) is declared once; CartridgeStore
    and the collection trainer's PendingStore both implement it, with its signatures."""
    import inspect

    from cas_jax.cartridges.store import BackingStore
    from cas_jax.training.pending_store import PendingStore

    main = fill_store(str(tmp_path / "main"), 3)
    view = PendingStore(main, CartridgeStore(str(tmp_path / "pending"), model_fingerprint=FP))
    for store in (main, view):
        assert isinstance(store, BackingStore)
        for name in ("load", "save"):
            assert (list(inspect.signature(getattr(store, name)).parameters)
                    == list(inspect.signature(getattr(BackingStore, name)).parameters)[1:])
    with BudgetManager(view, 10 * entry_nbytes(), opt_template=opt_template) as manager:
        [(c, s)] = manager.acquire(["doc1"])
        manager.update("doc1", *train_step(c, s))
        updated = as_bytes(jax.device_get(manager.acquire(["doc1"])[0]))
        manager.release(["doc1"])
        manager.release(["doc1"])
    assert view.pending.list() == ["doc1"]  # the write-back waits in the pending store
    assert as_bytes(view.load("doc1", opt_template=opt_template)[:2]) == updated
    assert as_bytes(main.load("doc1", opt_template=opt_template)[:2]) != updated
    assert view.commit(opt_template) == 1 and view.discard() == 1
    assert as_bytes(main.load("doc1", opt_template=opt_template)[:2]) == updated
