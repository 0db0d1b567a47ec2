"""Tokasaurus directories, vLLM prefix files and PEFT adapter folders (file level), bf16 export,
composition of several cartridges into one file with one sink, and the two launchers end to end
on a tiny model."""

import dataclasses
import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
from safetensors.numpy import save_file  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from cas_jax.cartridges import attention, store as store_lib  # noqa: E402
from cas_jax.cartridges.cartridge import CartridgeMeta, CartridgeMismatchError  # noqa: E402
from cas_jax.interop import convert as interop
from cas_jax.interop.convert import CartridgeFormatError  # noqa: E402
from cas_jax.model import llama as model_lib
from conftest import (CARTRIDGE_FINGERPRINT, CARTRIDGE_SHAPE, assert_bitwise_equal,  # noqa: E402
                      cartridge_prefix, make_cartridge, real_tokenizer, tiny_config)

FP = CARTRIDGE_FINGERPRINT
L, K, DH = SHAPE = CARTRIDGE_SHAPE  # layers, kv heads, head dim
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(path, fmt, shape=SHAPE):
    return interop.load(str(path), fmt, model_fingerprint=FP, doc_id="x", expected_shape=shape)


def tokasaurus_view(directory, page_size=16):
    """What Tokasaurus's CartridgeManager.load_cartridge and CartridgeConfig.from_config_yaml
    take from a cartridge directory: (max_tokens, keys, values as [L, 1, K, P, Dh] tensors)."""
    with open(os.path.join(directory, "config.yaml")) as f:
        max_tokens = yaml.safe_load(f)["kv_cache_initializer"]["max_tokens"]
    data = torch.load(os.path.join(directory, "cartridge.pt"), weights_only=False)
    if "frozen_keys" in data:
        data["fixed_keys"], data["fixed_values"] = data.pop("frozen_keys"), data.pop(
            "frozen_values")
    lists = [data[n] for n in ("trainable_keys", "trainable_values", "fixed_keys",
                               "fixed_values")]
    assert len({len(x) for x in lists}) == 1  # Tokasaurus refuses unequal lengths
    total = data["fixed_keys"][0].shape[2] + data["trainable_keys"][0].shape[2]
    assert total % page_size == 0 and total == max_tokens
    keys = torch.stack([torch.cat([f, t], 2) for f, t in zip(data["fixed_keys"],
                                                             data["trainable_keys"])])
    values = torch.stack([torch.cat([f, t], 2) for f, t in zip(data["fixed_values"],
                                                               data["trainable_values"])])
    return max_tokens, keys, values


# ----------------------------------------------------------------------------- tokasaurus


@pytest.mark.parametrize("num_frozen,names", [(1, "frozen"), (0, "frozen"), (2, "fixed")])
def test_tokasaurus_directory(tmp_path, num_frozen, names):
    c = make_cartridge(p=32, num_frozen=num_frozen)
    out = tmp_path / "cartridges" / "fr-geography"
    interop.save(c, str(out), "tokasaurus", names=names)
    assert sorted(os.listdir(out)) == ["cartridge.pt", "config.yaml"]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["kv_cache_initializer"] == {"max_tokens": 32, "num_frozen_tokens": num_frozen}
    data = torch.load(str(out / "cartridge.pt"), weights_only=True)
    assert sorted(data) == sorted(["trainable_keys", "trainable_values", f"{names}_keys",
                                   f"{names}_values"])
    assert data[f"{names}_keys"][0].shape == (1, K, num_frozen, DH)  # [0] exists even at 0
    max_tokens, keys, values = tokasaurus_view(str(out))
    assert max_tokens == 32
    np.testing.assert_array_equal(keys[:, 0].numpy().transpose(0, 2, 1, 3), c.keys)
    np.testing.assert_array_equal(values[:, 0].numpy().transpose(0, 2, 1, 3), c.values)
    back = load(out, "tokasaurus")
    assert_bitwise_equal(back, c)
    assert back.meta == CartridgeMeta(FP, "x", num_frozen, "tokasaurus")


@pytest.mark.parametrize("p,page_size,dropped", [(17, 16, 1), (31, 16, 15), (16, 32, 16),
                                                 (12, 8, 4)])
def test_tokasaurus_refuses_a_cartridge_it_would_trim(tmp_path, p, page_size, dropped):
    out = tmp_path / "c"
    with pytest.raises(ValueError, match=f"whole pages of {page_size} and would drop the last "
                                         f"{dropped} of these {p} \\(1 frozen \\+ {p - 1} "
                                         f"trainable\\)"):
        interop.save(make_cartridge(p=p), str(out), "tokasaurus", page_size=page_size)
    assert not out.exists()
    interop.save(make_cartridge(p=24), str(out), "tokasaurus", page_size=8)
    assert tokasaurus_view(str(out), page_size=8)[0] == 24


def test_tokasaurus_reader_checks_the_config(tmp_path):
    c = make_cartridge(p=16)
    out = tmp_path / "c"
    interop.save(c, str(out), "tokasaurus")
    config = out / "config.yaml"
    config.write_text("kv_cache_initializer:\n  value:\n    max_tokens: 16\n")  # wandb's form
    assert_bitwise_equal(load(out, "tokasaurus"), c)
    config.write_text("kv_cache_initializer:\n  max_tokens: 32\n")
    with pytest.raises(CartridgeFormatError, match="config.yaml: max_tokens 32, but .*"
                                                   "cartridge.pt holds 16 tokens"):
        load(out, "tokasaurus")
    config.write_text("model: {}\n")
    with pytest.raises(CartridgeFormatError, match="max_tokens is None, expected a positive"):
        load(out, "tokasaurus")
    config.write_text("kv_cache_initializer: [unclosed\n")
    with pytest.raises(CartridgeFormatError, match="config.yaml: not readable YAML"):
        load(out, "tokasaurus")
    config.unlink()
    with pytest.raises(FileNotFoundError, match="config.yaml: no such file"):
        load(out, "tokasaurus")
    with pytest.raises(FileNotFoundError, match="nowhere: no such Tokasaurus cartridge"):
        load(tmp_path / "nowhere", "tokasaurus")


# ----------------------------------------------------------------------------- vllm_prefix


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("num_frozen", [1, 0, 3])
def test_vllm_prefix_layout_and_round_trip(tmp_path, dtype, num_frozen):
    c = make_cartridge(p=7, dtype=dtype, num_frozen=num_frozen)
    path = tmp_path / "prefix.safetensors"
    interop.save(c, str(path), "vllm_prefix")
    tensors = load_file(str(path))  # what a PyTorch consumer reads
    assert sorted(tensors) == sorted(f"layers.{i}.attention.prefix.{kind}"
                                     for i in range(L) for kind in ("keys", "values"))
    for i in range(L):
        t = tensors[f"layers.{i}.attention.prefix.keys"]
        assert t.shape == (1, 7, K, DH)
        assert t.dtype == (torch.float32 if dtype == np.float32 else torch.bfloat16)
        np.testing.assert_array_equal(t[0].float().numpy(), c.keys[i].astype(np.float32))
    back = load(path, "vllm_prefix")
    assert_bitwise_equal(back, c)
    assert back.meta == CartridgeMeta(FP, "x", num_frozen, "vllm_prefix")


def test_vllm_prefix_errors_name_the_file(tmp_path):
    c = make_cartridge(p=5)
    good = {f"layers.{i}.attention.prefix.{kind}": np.asarray(getattr(c, kind))[i][None]
            for i in range(L) for kind in ("keys", "values")}

    def write(name, tensors, metadata=None):
        path = str(tmp_path / name)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path,
                  metadata=metadata)
        return path

    missing = dict(good)
    del missing["layers.1.attention.prefix.values"]
    with pytest.raises(CartridgeFormatError, match=r"missing.st: missing tensors "
                                                   r"\['layers.1.attention.prefix.values'\]"):
        load(write("missing.st", missing), "vllm_prefix")
    with pytest.raises(CartridgeFormatError, match=r"extra.st: unexpected tensors \['lm_head'\]"):
        load(write("extra.st", dict(good, lm_head=np.zeros(3, np.float32))), "vllm_prefix")
    short = dict(good, **{"layers.2.attention.prefix.keys": good[
        "layers.2.attention.prefix.keys"][:, :3]})
    with pytest.raises(CartridgeFormatError, match=r"short.st: layers.2.attention.prefix.keys "
                                                   r"is float32\[1, 3, 2, 4\]"):
        load(write("short.st", short), "vllm_prefix")
    ints = {k: v.astype(np.int32) for k, v in good.items()}
    with pytest.raises(CartridgeFormatError, match="ints.st: .* is int32, expected float32"):
        load(write("ints.st", ints), "vllm_prefix")
    with pytest.raises(CartridgeFormatError, match="frozen.st: 5 frozen of 5 tokens"):
        load(write("frozen.st", good, {"num_frozen_tokens": "5"}), "vllm_prefix")
    with pytest.raises(CartridgeMismatchError, match="ok.st: a cartridge for 3 layers .* "
                                                     "expected the model's 4 layers"):
        load(write("ok.st", good), "vllm_prefix", shape=(4, K, DH))
    ok = tmp_path / "ok.st"
    (tmp_path / "truncated.st").write_bytes(ok.read_bytes()[:-10])
    (tmp_path / "garbage.st").write_bytes(b"\x08" + b"\x00" * 7 + b"not json")
    for name in ("truncated.st", "garbage.st"):
        with pytest.raises(CartridgeFormatError, match=f"{name}: not a readable safetensors"):
            load(tmp_path / name, "vllm_prefix")
    with pytest.raises(FileNotFoundError, match="none.st: no such file"):
        load(tmp_path / "none.st", "vllm_prefix")


# ----------------------------------------------------------------------------- peft (files)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("num_frozen", [1, 0])
def test_peft_folder_layout_and_round_trip(tmp_path, dtype, num_frozen):
    c = make_cartridge(p=6, dtype=dtype, num_frozen=num_frozen)
    out = tmp_path / "adapter"
    interop.save(c, str(out), "peft")
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "CARTRIDGE" and config["task_type"] == "CAUSAL_LM"
    assert (config["num_virtual_tokens"], config["num_frozen_tokens"], config["num_layers"],
            config["num_attention_heads"], config["token_dim"]) == (6, num_frozen, L, K, K * DH)
    rows = load_file(str(out / "adapter_model.safetensors"))["prompt_embeddings"]
    assert rows.shape == (6, L * 2 * K * DH)
    per_layer = rows.float().numpy().reshape(6, L, 2, K, DH)  # PeftModel.get_prompt's view
    np.testing.assert_array_equal(per_layer[:, :, 0].transpose(1, 0, 2, 3),
                                  c.keys.astype(np.float32))
    np.testing.assert_array_equal(per_layer[:, :, 1].transpose(1, 0, 2, 3),
                                  c.values.astype(np.float32))
    back = load(out, "peft")
    assert_bitwise_equal(back, c)
    assert back.meta == CartridgeMeta(FP, "x", num_frozen, "peft")


def test_peft_errors_name_the_file(tmp_path):
    out = tmp_path / "adapter"
    interop.save(make_cartridge(p=6), str(out), "peft")
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    with pytest.raises(CartridgeMismatchError, match="adapter: a cartridge for 3 layers x 2 kv "
                                                     "heads x head_dim 4, expected the model's "
                                                     "3 layers x 2 kv heads x head_dim 8"):
        load(out, "peft", shape=(L, K, 8))

    def rewrite(**fields):
        config_path.write_text(json.dumps(dict(config, **fields)))

    rewrite(peft_type="LORA")
    with pytest.raises(CartridgeFormatError, match="adapter_config.json: peft_type 'LORA', "
                                                   "expected 'CARTRIDGE'"):
        load(out, "peft")
    rewrite(num_virtual_tokens=7)
    with pytest.raises(CartridgeFormatError, match=r"adapter_model.safetensors: "
                                                   r"prompt_embeddings has shape \[6, 48\], "
                                                   r"expected \[7, 48\]"):
        load(out, "peft")
    rewrite(num_frozen_tokens=6)
    with pytest.raises(CartridgeFormatError, match="6 frozen of 6 tokens"):
        load(out, "peft")
    rewrite(token_dim=7)
    with pytest.raises(CartridgeFormatError, match="token_dim 7 is not a multiple"):
        load(out, "peft")
    rewrite(num_layers="3")
    with pytest.raises(CartridgeFormatError, match="num_layers is '3', expected"):
        load(out, "peft")
    config_path.write_text("{not json")
    with pytest.raises(CartridgeFormatError, match="adapter_config.json: not readable JSON"):
        load(out, "peft")
    rewrite()
    weights = out / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CartridgeFormatError, match="adapter_model.safetensors: not a readable "
                                                   "safetensors file"):
        load(out, "peft")
    weights.rename(out / "adapter_model.bin")
    with pytest.raises(CartridgeFormatError, match="holds adapter_model.bin only"):
        load(out, "peft")


# ----------------------------------------------------------------------------- dtype, compose


def _store_with(tmp_path, cartridges):
    s = store_lib.CartridgeStore(str(tmp_path / "store"), FP)
    for c in cartridges:
        s.save(c.meta.doc_id, c)
    return s


def _out(tmp_path, fmt):
    return str(tmp_path / {"reference": "c.pt", "tokasaurus": "toka/c", "peft": "adapter",
                           "vllm_prefix": "c.safetensors"}[fmt])


@pytest.mark.parametrize("fmt", interop.FORMATS)
def test_bf16_export_in_every_format(tmp_path, fmt):
    c = make_cartridge(p=16, doc_id="fr")
    s = _store_with(tmp_path, [c])
    out = _out(tmp_path, fmt)
    common = dict(model_fingerprint=FP, expected_shape=SHAPE, format=fmt, store=s.root,
                  doc_ids=["fr"])
    written = interop.export_cartridge(out, dtype="bf16", **common)
    back = load(out, fmt)
    assert back.keys.dtype == ml_dtypes.bfloat16
    want = c.replace(keys=c.keys.astype(ml_dtypes.bfloat16),
                     values=c.values.astype(ml_dtypes.bfloat16))
    assert_bitwise_equal(back, want)
    assert_bitwise_equal(written, want)
    assert np.abs(back.keys.astype(np.float32) - c.keys).max() > 0  # it was rounded
    with pytest.raises(FileExistsError, match="exists; pass overwrite"):
        interop.export_cartridge(out, **common)
    interop.export_cartridge(out, overwrite=True, **common)  # f32 again: bitwise
    assert_bitwise_equal(load(out, fmt), c)


def test_compose_one_sink_drops_every_sink_but_the_first():
    a, b, c = (make_cartridge(p=p, num_frozen=f, doc_id=d, seed=i)
               for i, (p, f, d) in enumerate([(4, 1, "a"), (5, 2, "b"), (3, 0, "c")]))
    composed = interop.compose_one_sink([a, b, c])
    assert composed.keys.shape == (L, 4 + 4 + 2, K, DH)
    np.testing.assert_array_equal(composed.keys, np.concatenate([a.keys, b.keys[:, 1:],
                                                                 c.keys[:, 1:]], axis=1))
    np.testing.assert_array_equal(composed.values, np.concatenate([a.values, b.values[:, 1:],
                                                                   c.values[:, 1:]], axis=1))
    assert composed.meta == CartridgeMeta(FP, "a+b+c", 1, "composed")
    assert interop.compose_one_sink([b]) is b
    with pytest.raises(ValueError, match="dtypes .*bfloat16.*float32.* cannot share a file"):
        interop.compose_one_sink([a, interop.cast(b, "bf16")])


@pytest.mark.parametrize("fmt", interop.FORMATS)
def test_export_of_several_ids_is_the_composition(tmp_path, fmt):
    parts = [make_cartridge(p=p, doc_id=d, seed=i)
             for i, (p, d) in enumerate([(8, "a"), (5, "b"), (5, "c")])]  # 8 + 4 + 4 = 16
    s = _store_with(tmp_path, parts)
    out = _out(tmp_path, fmt)
    interop.export_cartridge(out, model_fingerprint=FP, expected_shape=SHAPE, format=fmt,
                             store=s.root, doc_ids=["a", "b", "c"])
    assert_bitwise_equal(load(out, fmt), interop.compose_one_sink(parts))


def test_composed_file_reads_as_cas_jax_composes():
    """Read as one prefix with the queries after it (what every single-cartridge consumer
    does), the composed cartridge gives cas_jax's logits for the composed set."""
    config = tiny_config(vocab_size=64, max_position_embeddings=128)
    params = model_lib.init_params(config, jax.random.PRNGKey(0))
    parts = [make_cartridge(p=p, doc_id=d, seed=i, shape=(2, 2, 8))
             for i, (p, d) in enumerate([(6, "a"), (4, "b"), (5, "c")])]
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, 7)))
    prefix = attention.compose_in_order(parts)
    start = int(attention.num_prefix_tokens(prefix, 1)[0])
    want, _ = model_lib.forward(params, tokens, start + jnp.arange(7)[None], prefix=prefix,
                                config=config)
    one = interop.compose_one_sink(parts)
    assert one.num_tokens == start == 13
    got, _ = model_lib.forward(params, tokens, start + jnp.arange(7)[None],
                               prefix=cartridge_prefix(one), config=config)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    every_sink = parts[0].replace(keys=np.concatenate([p.keys for p in parts], axis=1),
                                  values=np.concatenate([p.values for p in parts], axis=1))
    other, _ = model_lib.forward(params, tokens, 15 + jnp.arange(7)[None],
                                 prefix=cartridge_prefix(every_sink), config=config)
    assert np.abs(np.asarray(other) - np.asarray(want)).max() > 1e-3  # PEFT's keep-all differs


def test_export_arguments_are_checked(tmp_path):
    s = _store_with(tmp_path, [make_cartridge(doc_id="a")])
    common = dict(model_fingerprint=FP, expected_shape=SHAPE)
    out = str(tmp_path / "x")
    with pytest.raises(ValueError, match="format 'onnx'"):
        interop.export_cartridge(out, format="onnx", store=s.root, doc_ids=["a"], **common)
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        interop.export_cartridge(out, dtype="fp8", store=s.root, doc_ids=["a"], **common)
    with pytest.raises(ValueError, match="give either store and doc_ids, or cartridge_dirs"):
        interop.export_cartridge(out, store=s.root, **common)
    with pytest.raises(ValueError, match="give either"):
        interop.export_cartridge(out, store=s.root, doc_ids=["a"], cartridge_dirs=[out], **common)
    with pytest.raises(ValueError, match="would drop the last 15"):
        interop.export_cartridge(out, format="tokasaurus", store=s.root, doc_ids=["a", "a"],
                                 **common)  # 16 + 15 tokens
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------- launchers


def _run(module, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


def test_launchers_round_trip_a_composed_bf16_peft_adapter(tmp_path):
    from cas_jax.model import loading, weights

    tok = real_tokenizer()
    config = tiny_config(max_position_embeddings=128)
    folder = str(tmp_path / "model")
    weights.save_hf(folder, config, model_lib.init_params(config, jax.random.PRNGKey(0)),
                        tokenizer=tok)
    fp = loading.load_model(folder).fingerprint
    s = store_lib.CartridgeStore(str(tmp_path / "store"), fp)
    parts = [make_cartridge(p=p, doc_id=d, seed=i, shape=(2, 2, 8)) for i, (p, d)
             in enumerate([(9, "fr"), (8, "gm")])]
    for c in parts:
        s.save(c.meta.doc_id, c.replace(meta=CartridgeMeta(fp, c.meta.doc_id)))

    adapter = str(tmp_path / "adapter")
    r = _run("export_cartridge", f"--model={folder}", f"--store={s.root}", "--doc_id=fr,gm",
             "--format=peft", "--dtype=bf16", f"--out={adapter}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(peft): 2 layers, 1 frozen + 15 trainable tokens, bfloat16" in r.stdout
    r = _run("import_cartridge", f"--model={folder}", "--format=peft", f"--path={adapter}",
             f"--store={tmp_path / 'imported'}", "--doc_id=both", "--dtype=f32")
    assert r.returncode == 0, r.stderr[-2000:]
    back, opt_state, step = store_lib.CartridgeStore(str(tmp_path / "imported"), fp).load("both")
    want = interop.cast(interop.cast(interop.compose_one_sink(parts), "bf16"), "f32")
    assert_bitwise_equal(back, want)
    assert back.meta == CartridgeMeta(fp, "both", 1, "peft") and step == 0

    r = _run("export_cartridge", f"--model={folder}", f"--store={s.root}", "--doc_id=fr",
             "--format=tokasaurus", f"--out={tmp_path / 'toka' / 'fr'}")
    assert r.returncode != 0
    assert "would drop the last 9 of these 9" in r.stderr and "whole pages of 16" in r.stderr
    assert not (tmp_path / "toka").exists()


def test_exporting_cartridges_read_under_another_geometry_warns(tmp_path, caplog):
    """One file holds the serial composition only: cartridges cas_jax reads otherwise (here
    routed) are still written, with a warning naming their geometry; serial ones are not."""
    routed = "parallel,count_power=0.5,relevance=4,relevance_floor=1"
    parts = [make_cartridge(p=8, doc_id=d, seed=i) for i, d in enumerate("ab")]
    parts = [c.replace(meta=dataclasses.replace(c.meta, geometry=routed)) for c in parts]
    s = _store_with(tmp_path, parts)
    with caplog.at_level(logging.WARNING):
        interop.export_cartridge(str(tmp_path / "one.pt"), model_fingerprint=FP,
                                 expected_shape=SHAPE, store=s.root, doc_ids=["a"])
        assert not caplog.records  # one cartridge reads the same under every geometry
        interop.export_cartridge(str(tmp_path / "two.pt"), model_fingerprint=FP,
                                 expected_shape=SHAPE, store=s.root, doc_ids=["a", "b"])
    assert [r.getMessage() for r in caplog.records] == [
        f"cas_jax composes these cartridges under {routed}; one file holds the serial "
        "composition only, which is how its consumer will read them"]
