"""Reading and writing model weights: HF safetensors folders and GGUF files, no torch.

HF names map to the params pytree of `model.py` explicitly (`_HF_LAYER_KEYS`); HF linear weights
are [out, in] and are transposed to [in, out]. GGUF files store Q and K projection rows permuted
the way llama.cpp's converter does for its RoPE kernel; `_unpermute_qk` undoes it.
"""

from __future__ import annotations

import json
import os
import struct

import jax.numpy as jnp
import numpy as np

from cas_jax.model.config import ModelConfig, UnsupportedConfigError, from_hf_dict, load_hf_config

# params key in layers/ -> (HF suffix under model.layers.{i}., transpose)
_HF_LAYER_KEYS = {
    "attn_norm": ("input_layernorm.weight", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "q": ("self_attn.q_proj.weight", True),
    "k": ("self_attn.k_proj.weight", True),
    "v": ("self_attn.v_proj.weight", True),
    "o": ("self_attn.o_proj.weight", True),
    "q_bias": ("self_attn.q_proj.bias", False),
    "k_bias": ("self_attn.k_proj.bias", False),
    "v_bias": ("self_attn.v_proj.bias", False),
    "o_bias": ("self_attn.o_proj.bias", False),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
    "gate": ("mlp.gate_proj.weight", True),
    "up": ("mlp.up_proj.weight", True),
    "down": ("mlp.down_proj.weight", True),
}

# params key in layers/ -> GGUF name under blk.{i}.
_GGUF_LAYER_KEYS = {
    "attn_norm": "attn_norm.weight", "mlp_norm": "ffn_norm.weight",
    "q": "attn_q.weight", "k": "attn_k.weight", "v": "attn_v.weight", "o": "attn_output.weight",
    "q_bias": "attn_q.bias", "k_bias": "attn_k.bias", "v_bias": "attn_v.bias",
    "o_bias": "attn_output.bias", "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight",
    "gate": "ffn_gate.weight", "up": "ffn_up.weight", "down": "ffn_down.weight",
}


class WeightsError(ValueError):
    """A weights file is missing, truncated or does not match its config."""


def _layer_keys(config: ModelConfig) -> list[str]:
    keys = ["attn_norm", "mlp_norm", "q", "k", "v", "o", "gate", "up", "down"]
    if config.qkv_bias:
        keys += ["q_bias", "k_bias", "v_bias"]
    if config.o_bias:
        keys.append("o_bias")
    if config.qk_norm:
        keys += ["q_norm", "k_norm"]
    return keys


def _assemble(config: ModelConfig, get, dtype, source: str) -> dict:
    """Builds params from `get(kind, layer_key, layer) -> np.ndarray in [in, out] layout`."""
    from cas_jax.model.llama import param_shapes

    shapes = param_shapes(config)
    layers = {}
    for key in _layer_keys(config):
        stacked = np.stack([get("layer", key, i) for i in range(config.num_layers)])
        layers[key] = stacked
    params = {"embed": get("top", "embed", None), "final_norm": get("top", "final_norm", None),
              "layers": layers}
    if not config.tie_embeddings:
        params["lm_head"] = get("top", "lm_head", None)
    for name, arr in [("embed", params["embed"]), ("final_norm", params["final_norm"])] + [
            (f"layers/{k}", v) for k, v in layers.items()] + (
            [] if config.tie_embeddings else [("lm_head", params["lm_head"])]):
        want = shapes[name.split("/")[0]] if "/" not in name else shapes["layers"][name[7:]]
        if tuple(arr.shape) != tuple(want):
            raise WeightsError(f"{source}: tensor {name} has shape {tuple(arr.shape)}, "
                                  f"config implies {tuple(want)}")
    return _to_jax(params, dtype)


def _to_jax(params, dtype):
    import jax
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype=dtype), params)


# ----------------------------------------------------------------------------------- HF folders

def _safetensor_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files (and no index) found")
    paths = [os.path.join(folder, f) for f in files]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: listed in the safetensors index but missing")
    return paths


def _check_safetensors(path: str) -> None:
    """Raises WeightsError naming `path` if its header or data length is inconsistent."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: truncated safetensors file ({size} bytes)")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            raise WeightsError(f"{path}: truncated safetensors file (header says {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise WeightsError(f"{path}: corrupt safetensors header ({e})") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise WeightsError(f"{path}: truncated safetensors file: data needs {8 + n + end} "
                              f"bytes, file has {size}")


def load_hf(folder: str, dtype=jnp.float32) -> tuple[ModelConfig, dict]:
    """Loads an HF model folder (config.json + *.safetensors, optionally sharded)."""
    from safetensors.numpy import load_file

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: not a directory (expected an HF model folder)")
    config = load_hf_config(folder)
    tensors: dict[str, np.ndarray] = {}
    for path in _safetensor_files(folder):
        _check_safetensors(path)
        try:
            tensors.update(load_file(path))
        except Exception as e:  # safetensors raises its own error types
            raise WeightsError(f"{path}: cannot read safetensors ({e})") from e

    def take(name: str) -> np.ndarray:
        if name not in tensors:
            raise WeightsError(f"{folder}: tensor {name!r} missing from the safetensors files")
        return np.asarray(tensors[name], dtype=np.float32)

    def get(kind, key, i):
        if kind == "top":
            if key == "embed":
                return take("model.embed_tokens.weight")
            if key == "final_norm":
                return take("model.norm.weight")
            return take("lm_head.weight").T
        suffix, transpose = _HF_LAYER_KEYS[key]
        a = take(f"model.layers.{i}.{suffix}")
        return a.T if transpose else a

    return config, _assemble(config, get, dtype, folder)


def save_hf(folder: str, config: ModelConfig, params: dict, tokenizer=None) -> None:
    """Writes params as an HF folder: config.json, model.safetensors, tokenizer files."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    out = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = np.asarray(params["lm_head"]).T
    for key in _layer_keys(config):
        suffix, transpose = _HF_LAYER_KEYS[key]
        stacked = np.asarray(params["layers"][key], dtype=np.float32)
        for i in range(config.num_layers):
            out[f"model.layers.{i}.{suffix}"] = stacked[i].T if transpose else stacked[i]
    out = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in out.items()}
    save_file(out, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    hf = config.to_hf_dict()
    if tokenizer is not None:
        hf["bos_token_id"] = tokenizer.bos_token_id
        hf["eos_token_id"] = tokenizer.eos_token_id
        tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)


# ----------------------------------------------------------------------------------- GGUF files

def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation. w: [out_rows, in] (GGUF numpy layout)."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _open_gguf(path: str):
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: GGUF file not found")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct errors/IndexError on bad files
        raise WeightsError(f"{path}: cannot read GGUF file (truncated or corrupt?): {e}") from e


def gguf_config(reader, path: str) -> ModelConfig:
    """A ModelConfig from GGUF metadata (llama / qwen2 / qwen3 architectures)."""
    def field(name, default=None):
        f = reader.fields.get(name)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch not in ("llama", "qwen2", "qwen3"):
        raise UnsupportedConfigError(f"{path}: GGUF architecture {arch!r} not supported "
                                     "(expected llama, qwen2 or qwen3)")
    names = {t.name for t in reader.tensors}
    heads = int(field(f"{arch}.attention.head_count"))
    hidden = int(field(f"{arch}.embedding_length"))
    vocab = field(f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    d = {
        "model_type": arch, "vocab_size": int(vocab), "hidden_size": hidden,
        "intermediate_size": int(field(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(field(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(field(f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(field(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(field(f"{arch}.context_length", 8192)),
        "tie_word_embeddings": "output.weight" not in names,
    }
    if arch == "llama" and "blk.0.attn_q.bias" in names:
        d["attention_bias"] = True
    if field(f"{arch}.rope.scaling.type") not in (None, "none"):
        raise UnsupportedConfigError(f"{path}: GGUF rope scaling "
                                     f"{field(f'{arch}.rope.scaling.type')!r} not supported")
    return from_hf_dict(d, source=path)


def load_gguf(path: str, dtype=jnp.float32) -> tuple[ModelConfig, dict]:
    """Loads and dequantizes a GGUF file (F32/F16/BF16/Q8_0/Q4_0/Q4_1 and other gguf types)."""
    import gguf

    reader = _open_gguf(path)
    config = gguf_config(reader, path)
    tensors = {t.name: t for t in reader.tensors}

    def take(name: str) -> np.ndarray:
        if name not in tensors:
            raise WeightsError(f"{path}: tensor {name!r} missing from the GGUF file")
        t = tensors[name]
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise WeightsError(f"{path}: cannot dequantize {name} "
                                  f"({t.tensor_type.name}): {e}") from e
        return np.asarray(arr, dtype=np.float32)

    def get(kind, key, i):
        if kind == "top":
            if key == "embed":
                return take("token_embd.weight")
            if key == "final_norm":
                return take("output_norm.weight")
            return take("output.weight").T
        a = take(f"blk.{i}.{_GGUF_LAYER_KEYS[key]}")
        if config.model_type == "llama" and key in ("q", "k", "q_bias", "k_bias"):
            n = config.num_heads if key.startswith("q") else config.num_kv_heads
            a = _unpermute_qk(a, n)
        return a.T if a.ndim == 2 else a

    return config, _assemble(config, get, dtype, path)
