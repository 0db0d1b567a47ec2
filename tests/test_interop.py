"""Reference (PyTorch Cartridges) .pt files: bitwise round trips, layout, frozen_* and fixed_*
names, shape checks, errors, and store -> .pt -> store through the launchers' library
functions."""

import os

import jax
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cas_jax.cartridges import store as store_lib
from cas_jax.cartridges.cartridge import CartridgeMeta, CartridgeMismatchError
from cas_jax.interop import convert as interop
from cas_jax.interop.convert import CartridgeFormatError
from cas_jax.training import train
from cas_jax.training.train_collection import opt_template_fn
from conftest import CARTRIDGE_FINGERPRINT, CARTRIDGE_SHAPE, assert_bitwise_equal, make_cartridge

FP = CARTRIDGE_FINGERPRINT
L, K, DH = SHAPE = CARTRIDGE_SHAPE  # layers, kv heads, head dim
P = 7  # tokens
REFERENCE_KEYS = ("trainable_keys", "trainable_values", "frozen_keys", "frozen_values")


def write(path, data):
    torch.save(data, str(path))
    return str(path)


def reference_dict(num_frozen=1, layers=L, heads=K, tokens=P, dtype=torch.float32):
    """A file's dict as the reference writes it: nn.ParameterLists of (frozen) Parameters."""
    torch.manual_seed(0)

    def params(n, grad):
        return torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(1, heads, n, DH, dtype=dtype), requires_grad=grad)
             for _ in range(layers)] if n else [])

    return {"trainable_keys": params(tokens - num_frozen, True),
            "trainable_values": params(tokens - num_frozen, True),
            "frozen_keys": params(num_frozen, False), "frozen_values": params(num_frozen, False)}


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("num_frozen", [1, 3, 0])
def test_round_trip_is_bitwise(tmp_path, dtype, num_frozen):
    c = make_cartridge(P, dtype, num_frozen)
    path = str(tmp_path / "cartridge.pt")
    interop.save_reference_cartridge(c, path)
    back = interop.load_reference_cartridge(path, model_fingerprint=FP, doc_id="doc",
                                            expected_shape=SHAPE)
    assert_bitwise_equal(back, c)
    assert back.meta == CartridgeMeta(FP, "doc", num_frozen, "reference")
    assert os.listdir(tmp_path) == ["cartridge.pt"]  # no temporary file left behind


@pytest.mark.parametrize("dtype,torch_dtype", [(np.float32, torch.float32),
                                               (ml_dtypes.bfloat16, torch.bfloat16)])
def test_file_has_the_reference_layout(tmp_path, dtype, torch_dtype):
    c = make_cartridge(P, dtype, num_frozen=2)
    path = str(tmp_path / "cartridge.pt")
    interop.save_reference_cartridge(c, path)
    data = torch.load(path, weights_only=True)
    assert sorted(data) == sorted(REFERENCE_KEYS)
    for name, tokens in (("frozen", 2), ("trainable", P - 2)):
        for kind, src in (("keys", c.keys), ("values", c.values)):
            seq = data[f"{name}_{kind}"]
            assert isinstance(seq, list) and len(seq) == L
            for layer, t in enumerate(seq):
                assert t.shape == (1, K, tokens, DH) and t.dtype == torch_dtype
                start = 0 if name == "frozen" else 2
                want = np.asarray(src)[layer, start:start + tokens].transpose(1, 0, 2)
                got = t[0].float().numpy()
                np.testing.assert_array_equal(got, want.astype(np.float32))


def test_reads_reference_parameter_lists(tmp_path):
    data = reference_dict(num_frozen=1, dtype=torch.bfloat16)
    c = interop.load_reference_cartridge(write(tmp_path / "ref.pt", data), model_fingerprint=FP,
                                         expected_shape=SHAPE)
    assert c.keys.shape == (L, P, K, DH) and c.keys.dtype == ml_dtypes.bfloat16
    assert c.meta.num_frozen == 1
    for layer in range(L):
        want = torch.cat([data["frozen_keys"][layer], data["trainable_keys"][layer]], dim=2)
        np.testing.assert_array_equal(c.keys[layer].astype(np.float32),
                                      want[0].detach().float().numpy().transpose(1, 0, 2))


def as_fixed(data):
    """A reference dict with the pre-August-2025 names of the frozen lists."""
    data = dict(data)
    data["fixed_keys"], data["fixed_values"] = data.pop("frozen_keys"), data.pop("frozen_values")
    return data


@pytest.mark.parametrize("num_frozen", [1, 2, 0])
def test_reads_pre_august_2025_fixed_names(tmp_path, num_frozen):
    data = reference_dict(num_frozen=num_frozen, dtype=torch.bfloat16)
    new = interop.load_reference_cartridge(write(tmp_path / "new.pt", data),
                                           model_fingerprint=FP, expected_shape=SHAPE)
    old = interop.load_reference_cartridge(write(tmp_path / "old.pt", as_fixed(data)),
                                           model_fingerprint=FP, expected_shape=SHAPE)
    assert old.meta.num_frozen == num_frozen and old.keys.shape == (L, P, K, DH)
    assert_bitwise_equal(old, new)
    if num_frozen:
        np.testing.assert_array_equal(old.values[:, :num_frozen].astype(np.float32),
                                      np.stack([t[0].detach().float().numpy().transpose(1, 0, 2)
                                                for t in data["frozen_values"]]))


@pytest.mark.parametrize("names", ["fixed", "frozen"])
def test_writes_either_names(tmp_path, names):
    c = make_cartridge(P, num_frozen=2)
    path = str(tmp_path / "c.pt")
    interop.save_reference_cartridge(c, path, names=names)
    data = torch.load(path, weights_only=True)
    assert sorted(data) == sorted(["trainable_keys", "trainable_values", f"{names}_keys",
                                   f"{names}_values"])
    assert data[f"{names}_keys"][0].shape == (1, K, 2, DH)
    assert_bitwise_equal(interop.load_reference_cartridge(path, model_fingerprint=FP), c)
    with pytest.raises(ValueError, match="names 'fixd'"):
        interop.save_reference_cartridge(c, path, names="fixd")


def test_frozen_and_fixed_names_together_or_neither_are_refused(tmp_path):
    data = reference_dict()
    both = dict(data, fixed_keys=data["frozen_keys"], fixed_values=data["frozen_values"])
    with pytest.raises(CartridgeFormatError, match=r"both.pt: has both frozen_\* and fixed_\*"):
        interop.load_reference_cartridge(write(tmp_path / "both.pt", both), model_fingerprint=FP)
    neither = {k: v for k, v in data.items() if k.startswith("trainable")}
    with pytest.raises(CartridgeFormatError, match=r"neither.pt: missing keys \['frozen_keys', "
                                                   r"'frozen_values'\].*or fixed_keys, "
                                                   r"fixed_values \(before\)"):
        interop.load_reference_cartridge(write(tmp_path / "neither.pt", neither),
                                         model_fingerprint=FP)
    half = dict(as_fixed(data))
    del half["fixed_values"]
    with pytest.raises(CartridgeFormatError, match=r"missing keys \['fixed_values'\]"):
        interop.load_reference_cartridge(write(tmp_path / "half.pt", half), model_fingerprint=FP)


@pytest.mark.parametrize("shape", [(L + 1, K, DH), (L, K * 2, DH), (L, K, DH * 2)])
def test_other_models_shape_is_rejected(tmp_path, shape):
    path = str(tmp_path / "cartridge.pt")
    interop.save_reference_cartridge(make_cartridge(P), path)
    with pytest.raises(CartridgeMismatchError, match="cartridge.pt.*expected the model's"):
        interop.load_reference_cartridge(path, model_fingerprint=FP, expected_shape=shape)


def test_unreadable_files_are_named(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file" * 8)
    good = tmp_path / "good.pt"
    interop.save_reference_cartridge(make_cartridge(P), str(good))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    for path in (garbage, truncated):
        with pytest.raises(CartridgeFormatError, match=f"{path.name}: not a readable torch"):
            interop.load_reference_cartridge(str(path), model_fingerprint=FP)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        interop.load_reference_cartridge(str(tmp_path / "missing.pt"), model_fingerprint=FP)


def test_malformed_contents_give_clear_errors(tmp_path):
    def load(data):
        return interop.load_reference_cartridge(write(tmp_path / "c.pt", data),
                                                model_fingerprint=FP, expected_shape=SHAPE)

    with pytest.raises(CartridgeFormatError, match="c.pt: holds a list, expected a dict"):
        load([torch.zeros(1)])
    data = reference_dict()
    del data["frozen_values"]
    with pytest.raises(CartridgeFormatError, match=r"c.pt: missing keys \['frozen_values'\]"):
        load(data)
    data = reference_dict()
    data["trainable_values"] = data["trainable_values"][:-1]
    with pytest.raises(CartridgeFormatError, match="trainable_keys has 3 layers, "
                                                   "trainable_values 2"):
        load(data)
    data = reference_dict()
    data["frozen_keys"], data["frozen_values"] = (data["frozen_keys"][:1],
                                                  data["frozen_values"][:1])
    with pytest.raises(CartridgeFormatError, match="frozen_keys has 1 layers, trainable_keys 3"):
        load(data)
    data = reference_dict()
    data["trainable_keys"] = [t[0] for t in data["trainable_keys"]]
    with pytest.raises(CartridgeFormatError, match=r"trainable_keys\[0\] has shape \[2, 6, 4\], "
                                                   r"expected \[1, kv_heads, tokens, head_dim\]"):
        load(data)
    data = reference_dict()
    data["trainable_keys"] = [t.detach().repeat(2, 1, 1, 1) for t in data["trainable_keys"]]
    with pytest.raises(CartridgeFormatError, match=r"has shape \[2, 2, 6, 4\]"):
        load(data)
    data = reference_dict()
    data["frozen_keys"] = [t.detach().repeat(1, 2, 1, 1) for t in data["frozen_keys"]]
    data["frozen_values"] = [t.detach().repeat(1, 2, 1, 1) for t in data["frozen_values"]]
    with pytest.raises(CartridgeFormatError, match="frozen tokens are .* 4 kv heads .* "
                                                   "trainable ones .* 2 x 4; expected"):
        load(data)
    data = reference_dict()
    data["trainable_values"][1] = data["trainable_values"][1].detach()[:, :, :3]
    with pytest.raises(CartridgeFormatError, match=r"trainable_values\[1\] is float32\[1, 2, 3, "
                                                   r"4\], trainable_keys\[0\] is float32"):
        load(data)
    data = reference_dict()
    for name in ("trainable_keys", "trainable_values"):
        data[name] = [t.detach()[:, :, :0] for t in data[name]]
    with pytest.raises(CartridgeFormatError, match="zero trainable tokens"):
        load(data)
    with pytest.raises(CartridgeFormatError, match="trainable_keys is empty"):
        load(reference_dict(layers=0))


def test_store_round_trip_through_the_launchers(tmp_path):
    src = store_lib.CartridgeStore(str(tmp_path / "src"), FP)
    c = make_cartridge(P, ml_dtypes.bfloat16, num_frozen=1, doc_id="fr")
    src.save("fr", c)
    pt = str(tmp_path / "fr.pt")
    common = dict(model_fingerprint=FP, expected_shape=SHAPE)
    interop.export_cartridge(pt, store=src.root, doc_ids=["fr"], **common)
    with pytest.raises(FileExistsError, match="fr.pt exists"):
        interop.export_cartridge(pt, store=src.root, doc_ids=["fr"], **common)

    # Into a train_collection folder: its cartridges/ store, with a fresh trainable Adam state.
    run_dir = tmp_path / "run"
    store_lib.CartridgeStore(str(run_dir / "cartridges"), FP)
    interop.import_cartridge(pt, str(run_dir), "fr", **common)
    dst = store_lib.CartridgeStore(str(run_dir / "cartridges"), FP)
    template = opt_template_fn(train.make_optimizer(train.TrainConfig()))
    back, opt_state, step = dst.load("fr", opt_template=template)
    assert_bitwise_equal(back, c)
    assert back.meta == CartridgeMeta(FP, "fr", 1, "reference") and step == 0
    assert all(not np.asarray(x).any() for x in jax.tree.leaves(opt_state)
               if np.asarray(x).ndim)
    with pytest.raises(FileExistsError, match="'fr' is already in store"):
        interop.import_cartridge(pt, str(run_dir), "fr", **common)

    # Into a new folder (a store root), without optimizer state; exported again, same bits.
    interop.import_cartridge(pt, str(tmp_path / "new"), "fr", with_opt_state=False, **common)
    plain = store_lib.CartridgeStore(str(tmp_path / "new"), FP)
    assert plain.load("fr")[1] is None
    again = str(tmp_path / "again.pt")
    interop.export_cartridge(again, store=plain.root, doc_ids=["fr"], **common)
    assert_bitwise_equal(
        interop.load_reference_cartridge(again, model_fingerprint=FP, expected_shape=SHAPE), c)


def test_export_from_a_cartridge_directory_checks_the_model(tmp_path):
    c = make_cartridge(P)
    store_lib.save_cartridge(str(tmp_path / "train_out" / "cartridge"), c)
    pt = str(tmp_path / "c.pt")
    for source in ("train_out", "train_out/cartridge"):  # output_dir or the cartridge itself
        interop.export_cartridge(pt, cartridge_dirs=[str(tmp_path / source)], overwrite=True,
                                 model_fingerprint=FP, expected_shape=SHAPE)
        assert_bitwise_equal(interop.load_reference_cartridge(pt, model_fingerprint=FP), c)
    with pytest.raises(CartridgeMismatchError, match="made for model tiny-fp"):
        interop.export_cartridge(pt, cartridge_dirs=[str(tmp_path / "train_out")], overwrite=True,
                                 model_fingerprint="other", expected_shape=SHAPE)
    with pytest.raises(CartridgeMismatchError, match="kv_heads=4"):
        interop.export_cartridge(pt, cartridge_dirs=[str(tmp_path / "train_out")], overwrite=True,
                                 model_fingerprint=FP, expected_shape=(L, 4, DH))
    with pytest.raises(store_lib.CartridgeNotFoundError, match="no cartridge store"):
        interop.export_cartridge(pt, store=str(tmp_path / "nowhere"), doc_ids=["x"], overwrite=True,
                                 model_fingerprint=FP, expected_shape=SHAPE)
    with pytest.raises(CartridgeMismatchError):  # an imported file must fit the model too
        interop.import_cartridge(pt, str(tmp_path / "s"), "x", model_fingerprint=FP,
                                 expected_shape=(L, K, DH * 2))
