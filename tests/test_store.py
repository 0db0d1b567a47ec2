"""CartridgeStore and standalone cartridge directories: round trips, atomicity, corruption."""

import json
import os
import re

import jax
import ml_dtypes
import numpy as np
import optax
import pytest

from cas_jax.cartridges import files as cartridge_files, store as store_lib
from cas_jax.cartridges.cartridge import Cartridge, CartridgeMeta, CartridgeMismatchError
from cas_jax.cartridges.store import (CartridgeNotFoundError, CartridgeStore, CorruptCartridgeError,
                                      OptStateMismatchError, load_cartridge, save_cartridge)

FP = "model-a"
SHAPE = (2, 4, 1, 8)  # [layers, tokens, kv_heads, head_dim]
OPTIMIZER = optax.adam(1e-2)


def make_cartridge(doc_id: str, seed: int, dtype=ml_dtypes.bfloat16, fp: str = FP) -> Cartridge:
    rng = np.random.default_rng(seed)
    return Cartridge(keys=rng.standard_normal(SHAPE).astype(dtype),
                     values=rng.standard_normal(SHAPE).astype(dtype),
                     meta=CartridgeMeta(model_fingerprint=fp, doc_id=doc_id))


def make_opt_state(cartridge: Cartridge, seed: int):
    """An Adam state with distinct random moments, so restoring the wrong leaf would show."""
    state = OPTIMIZER.init(cartridge)
    rng = np.random.default_rng(seed + 1000)
    return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype), state)


def opt_template(cartridge: Cartridge):
    return jax.eval_shape(OPTIMIZER.init, cartridge)


def assert_trees_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


@pytest.fixture
def store(tmp_path):
    return CartridgeStore(str(tmp_path / "store"), model_fingerprint=FP)


def test_round_trip_is_bitwise_with_step_meta_and_opt_state(store):
    c = make_cartridge("doc-1", 0)
    opt = make_opt_state(c, 0)
    store.save("doc-1", c, opt, step=17)
    c2, opt2, step = store.load("doc-1", opt_template=opt_template)
    assert step == 17 and c2.meta == c.meta
    assert_trees_bitwise_equal(c2, c)
    assert_trees_bitwise_equal(opt2, opt)
    # A pytree template works too, and without one the state comes back keyed by tree path.
    assert_trees_bitwise_equal(store.load("doc-1", opt_template=opt_template(c))[1], opt)
    flat = store.load("doc-1")[1]
    assert set(flat) == {"[0].count", "[0].mu.keys", "[0].mu.values", "[0].nu.keys",
                         "[0].nu.values"}
    assert flat["[0].mu.keys"].tobytes() == np.asarray(opt[0].mu.keys).tobytes()
    assert store.load("doc-1", read_opt_state=False)[1] is None
    assert_trees_bitwise_equal(store.load_cartridge("doc-1"), c)


def test_cached_opt_template_matches_eval_shape(store):
    template = store_lib.cached_opt_template(OPTIMIZER.init)
    for doc_id in ["doc-1", "doc-2"]:
        c = make_cartridge(doc_id, 0)
        assert jax.tree.structure(template(c)) == jax.tree.structure(opt_template(c))
        opt = make_opt_state(c, 1)
        store.save(doc_id, c, opt)
        assert_trees_bitwise_equal(store.load(doc_id, opt_template=template)[1], opt)
    wide = c.replace(keys=np.zeros((2, 6, 1, 8), np.float32),
                     values=np.zeros((2, 6, 1, 8), np.float32))
    assert template(wide)[0].mu.keys.shape == (2, 6, 1, 8)


def test_all_zero_arrays_and_no_opt_state(store):
    c = Cartridge(np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.float32),
                  CartridgeMeta(FP, "zeros"))
    store.save("zeros", c)
    c2, opt, step = store.load("zeros", opt_template=opt_template)
    assert opt is None and step == 0
    assert_trees_bitwise_equal(c2, c)


def test_data_file_is_plain_numpy(store):
    c = make_cartridge("doc-1", 0)
    store.save("doc-1", c, make_opt_state(c, 0))
    directory = store.cartridge_dir("doc-1")
    with open(os.path.join(directory, "v00000001.json")) as f:
        manifest = json.load(f)
    [values] = [e for e in manifest["arrays"] if e["name"] == "values"]
    assert values["offset"] % 64 == 0
    raw = np.fromfile(os.path.join(directory, "v00000001.bin"), dtype=ml_dtypes.bfloat16,
                      offset=values["offset"], count=values["nbytes"] // 2)
    assert raw.tobytes() == c.values.tobytes()


def test_ids_list_exists_delete(store):
    ids = ["a/b", "..", ".hidden", "ünï cødé", "x%41", "STORE.json"]
    for i, doc_id in enumerate(ids):
        store.save(doc_id, make_cartridge(doc_id, i))
    assert store.list() == sorted(ids)
    for i, doc_id in enumerate(ids):
        assert store.exists(doc_id)
        assert_trees_bitwise_equal(store.load_cartridge(doc_id), make_cartridge(doc_id, i))
    store.delete("a/b")
    assert not store.exists("a/b") and "a/b" not in store.list()
    with pytest.raises(CartridgeNotFoundError, match="'a/b'"):
        store.load("a/b")
    with pytest.raises(CartridgeNotFoundError, match="'never-saved'"):
        store.delete("never-saved")
    # Reopening sees the same contents.
    assert CartridgeStore(store.root).list() == sorted(set(ids) - {"a/b"})


def test_keeps_one_previous_version(store):
    for step in range(4):
        store.save("doc", make_cartridge("doc", step), step=step)
    assert sorted(os.listdir(store.cartridge_dir("doc"))) == [
        "CURRENT", "v00000003.bin", "v00000003.json", "v00000004.bin", "v00000004.json"]
    assert store.load("doc")[2] == 3


def test_crash_before_switch_keeps_previous_version(store, monkeypatch):
    store.save("doc", make_cartridge("doc", 0), step=1)
    store.save("other", make_cartridge("other", 5), step=1)

    def crash(*args):
        raise KeyboardInterrupt("simulated crash after the data is written, before the switch")

    monkeypatch.setattr(cartridge_files, "_point_current", crash)
    with pytest.raises(KeyboardInterrupt):
        store.save("doc", make_cartridge("doc", 1), step=2)
    monkeypatch.undo()
    assert "v00000002.json" in os.listdir(store.cartridge_dir("doc"))  # Written, never live.
    c, _, step = store.load("doc")
    assert step == 1
    assert_trees_bitwise_equal(c, make_cartridge("doc", 0))
    # The next successful save deletes the version that never went live.
    store.save("doc", make_cartridge("doc", 2), step=3)
    assert store.load("doc")[2] == 3
    assert sorted(os.listdir(store.cartridge_dir("doc"))) == [
        "CURRENT", "v00000001.bin", "v00000001.json", "v00000003.bin", "v00000003.json"]


def test_crash_while_writing_data_keeps_previous_version(store, monkeypatch):
    store.save("doc", make_cartridge("doc", 0), step=1)
    write_data = cartridge_files._write_data

    def write_then_crash(path, arrays):
        write_data(path, arrays)
        with open(path, "r+b") as f:
            f.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(cartridge_files, "_write_data", write_then_crash)
    with pytest.raises(OSError, match="disk full"):
        store.save("doc", make_cartridge("doc", 1), step=2)
    assert store.load("doc")[2] == 1


def _corrupt_data_file(store, doc_id, how):
    path = os.path.join(store.cartridge_dir(doc_id), "v00000001.bin")
    if how == "garble":
        with open(path, "r+b") as f:
            f.seek(7)  # Inside `keys`, the first array.
            byte = f.read(1)
            f.seek(7)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 3)
    else:
        os.remove(path)
    return path


@pytest.mark.parametrize("how,message", [("garble", "'keys' in .* fails its CRC-32C"),
                                         ("truncate", "truncated"), ("remove", "missing")])
def test_corrupt_array_is_named_and_others_still_load(store, how, message):
    for i in range(3):
        store.save(f"doc{i}", make_cartridge(f"doc{i}", i), make_opt_state(make_cartridge(
            f"doc{i}", i), i))
    path = _corrupt_data_file(store, "doc1", how)
    with pytest.raises(CorruptCartridgeError) as e:
        store.load("doc1")
    assert "'doc1'" in str(e.value) and path in str(e.value)
    assert re.search(message, str(e.value))
    for i in (0, 2):
        assert_trees_bitwise_equal(store.load_cartridge(f"doc{i}"),
                                   make_cartridge(f"doc{i}", i))
    report = store.verify()
    assert report.ok == ("doc0", "doc2") and list(report.errors) == ["doc1"]
    assert not report.all_ok and path in report.errors["doc1"]
    # Saving a fresh version repairs it.
    store.save("doc1", make_cartridge("doc1", 1))
    assert store.verify().all_ok


def test_garbled_manifest_is_named(store):
    store.save("doc", make_cartridge("doc", 0), step=4)
    path = os.path.join(store.cartridge_dir("doc"), "v00000001.json")
    text = open(path).read().replace('"step": 4', '"step": 5')
    with open(path, "w") as f:
        f.write(text)
    with pytest.raises(CorruptCartridgeError, match=f"'doc'.*{path}.*CRC-32C"):
        CartridgeStore(store.root, FP).load("doc")  # a reader that did not write it
    # The writer keeps the manifest it wrote (versions are immutable) and still loads the right
    # data; verify() always re-reads manifests and reports the file.
    assert store.load("doc")[2] == 4
    assert path in store.verify("doc").errors["doc"]


def test_fingerprint_mismatch(store, tmp_path):
    store.save("doc", make_cartridge("doc", 0))
    with pytest.raises(CartridgeMismatchError, match="'doc'.*model-a.*model-b"):
        store.load("doc", expected_fingerprint="model-b")
    with pytest.raises(CartridgeMismatchError, match="'doc'"):
        CartridgeStore(store.root, model_fingerprint="model-b").load_cartridge("doc")
    with pytest.raises(CartridgeMismatchError, match="model-b"):
        store.save("other", make_cartridge("other", 1, fp="model-b"))
    with pytest.raises(ValueError, match="'doc'.*'other'"):
        store.save("other", make_cartridge("doc", 1))


def test_opt_template_mismatch(store):
    c = make_cartridge("doc", 0)
    store.save("doc", c, make_opt_state(c, 0))
    sgd_template = jax.eval_shape(optax.sgd(0.1, momentum=0.9).init, c)
    with pytest.raises(OptStateMismatchError, match="'doc'"):
        store.load("doc", opt_template=sgd_template)
    wrong_dtype = jax.eval_shape(OPTIMIZER.init, c.replace(keys=c.keys.astype(np.float32),
                                                           values=c.values.astype(np.float32)))
    with pytest.raises(OptStateMismatchError, match=r"\[0\].mu.keys"):
        store.load("doc", opt_template=wrong_dtype)


def test_standalone_cartridge_directory(tmp_path, store):
    c = make_cartridge("doc", 0)
    path = str(tmp_path / "trained")
    save_cartridge(path, c, make_opt_state(c, 0), step=9)
    assert_trees_bitwise_equal(load_cartridge(path, expected_fingerprint=FP), c)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_cartridge(path, make_cartridge("doc", 1))
    save_cartridge(path, make_cartridge("doc", 1), overwrite=True)
    assert_trees_bitwise_equal(load_cartridge(path), make_cartridge("doc", 1))
    assert sorted(os.listdir(tmp_path)) == ["store", "trained"]
    with pytest.raises(CartridgeMismatchError, match="trained"):
        load_cartridge(path, expected_fingerprint="model-b")
    with pytest.raises(CartridgeNotFoundError, match="absent"):
        load_cartridge(str(tmp_path / "absent"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a cartridge"):
        save_cartridge(str(tmp_path / "other"), c)
    # A store's cartridge directory loads the same way.
    store.save("doc", c)
    assert_trees_bitwise_equal(load_cartridge(store.cartridge_dir("doc")), c)


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(store_lib.CartridgeStoreError, match="STORE.json"):
        CartridgeStore(str(tmp_path / "junk"))


def test_adopt_links_the_live_version_and_falls_back_to_a_copy(store, tmp_path, monkeypatch):
    """adopt: the other store's live version becomes this store's by hard links (same inode),
    bitwise, keeping one previous version; where links fail it is loaded and saved instead."""
    other = CartridgeStore(str(tmp_path / "pending"), model_fingerprint=FP)
    old, new = make_cartridge("d", 0), make_cartridge("d", 1)
    store.save("d", old, make_opt_state(old, 0), step=1)
    other.save("d", new, make_opt_state(new, 1), step=2)
    store.adopt("d", other)
    live = lambda s: os.path.join(s.cartridge_dir("d"), open(os.path.join(
        s.cartridge_dir("d"), "CURRENT")).read().strip() + ".bin")
    assert os.path.samefile(live(store), live(other))
    other.delete("d")
    c, opt, step = store.load("d", opt_template=opt_template)
    assert step == 2
    assert_trees_bitwise_equal((c, opt), (new, make_opt_state(new, 1)))
    assert len([n for n in os.listdir(store.cartridge_dir("d")) if n.endswith(".bin")]) == 2

    third = make_cartridge("d", 2)
    other.save("d", third, make_opt_state(third, 2), step=3)

    def no_links(*args):
        raise OSError("cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    store.adopt("d", other, opt_template)
    assert not os.path.samefile(live(store), live(other))
    c, opt, step = store.load("d", opt_template=opt_template)
    assert step == 3
    assert_trees_bitwise_equal((c, opt), (third, make_opt_state(third, 2)))


def test_adopt_refuses_another_models_cartridge(store, tmp_path):
    foreign = CartridgeStore(str(tmp_path / "foreign"), model_fingerprint="model-b")
    foreign.save("d", make_cartridge("d", 0, fp="model-b"))
    with pytest.raises(CartridgeMismatchError, match="cartridge 'd'.*model-b"):
        store.adopt("d", foreign)
    assert not store.exists("d")


def test_documents_are_recorded_beside_their_cartridges(store):
    """A store keeps the text each cartridge stands for (what a routing reader scores), by
    id as cartridges are quoted; a cartridge directory finds its store's texts."""
    assert store.documents() == {} and store_lib.documents_of(store.cartridge_dir("a")) == {}
    store.save(".hidden/x", make_cartridge(".hidden/x", 0))
    store.save_document(".hidden/x", "Zorbania's capital is Quillton. Ünïcode kept.")
    store.save_document("b", "first")
    store.save_document("b", "second")  # replaced, atomically
    want = {".hidden/x": "Zorbania's capital is Quillton. Ünïcode kept.", "b": "second"}
    assert store.documents() == want
    assert store_lib.documents_of(store.cartridge_dir(".hidden/x")) == want
    assert not [n for n in os.listdir(os.path.join(store.root, "documents"))
                if n.endswith(".tmp")]
    assert store.list() == [".hidden/x"]  # documents are not cartridges
    with pytest.raises(TypeError, match="document 'c'"):
        store.save_document("c", b"bytes")
    with open(store.document_path("bad"), "wb") as f:
        f.write(b"\xff\xfe not text")
    with pytest.raises(store_lib.CartridgeStoreError, match=r"documents/bad\.txt.*not UTF-8"):
        store.documents()
