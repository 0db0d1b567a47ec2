"""Model configuration: a frozen dataclass built from an HF `config.json` or GGUF metadata.

Only what the decoder in `model.py` implements is accepted. A key that would change the
computation and is not implemented raises `UnsupportedConfigError` naming the key, rather
than being silently ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# Keys that carry no information the forward pass needs (bookkeeping, generation defaults,
# initialisation). Anything else not read below is rejected.
_IGNORED_KEYS = frozenset({
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout",
    "hidden_dropout", "max_position_embeddings", "_name_or_path", "is_llama_config",
    "rope_interleaved", "pretraining_tp", "max_window_layers", "output_attentions",
    "output_hidden_states", "return_dict", "tie_word_embeddings", "layer_types",
    "use_sliding_window", "sliding_window", "id2label", "label2id", "chunk_size_feed_forward",
    "quantization_config", "auto_map", "generation_config", "head_dim", "attention_bias",
    "mlp_bias", "rope_scaling", "rope_parameters", "rope_theta", "rms_norm_eps",
    "num_key_value_heads", "num_attention_heads", "num_hidden_layers", "hidden_size",
    "intermediate_size", "vocab_size", "hidden_act", "problem_type", "tokenizer_class",
    "keys_to_ignore_at_inference", "use_mrope", "attn_implementation",
})


class UnsupportedConfigError(ValueError):
    """A config asks for something the cas_jax decoder does not implement."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of a Llama-family decoder.

    All fields are Python scalars, so the config is hashable and can be a static jit argument.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # llama3 rope scaling: (factor, low_freq_factor, high_freq_factor, original_max_position).
    rope_llama3: tuple[float, float, float, int] | None = None
    # Linear rope scaling factor (positions divided by it), 1.0 means none.
    rope_linear_factor: float = 1.0
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: bias on q, k, v projections.
    o_bias: bool = False  # Llama `attention_bias`: bias on q, k, v and o.
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE.
    sliding_window: int | None = None  # Keys further back than this many positions are masked.
    max_position_embeddings: int = 8192

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token over all layers, in the dtype size of 2 bytes (bf16)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2

    def fingerprint(self) -> str:
        """Short stable hash of everything that decides the meaning of a KV cache."""
        fields = dataclasses.asdict(self)
        fields.pop("max_position_embeddings")
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF `config.json` dict that `from_hf_dict` maps back to this config."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[self.model_type]
        d: dict[str, Any] = {
            "architectures": [arch], "model_type": self.model_type, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_embeddings, "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
        }
        if self.model_type == "llama":
            d["attention_bias"] = self.o_bias
        if self.rope_llama3 is not None:
            f, lo, hi, orig = self.rope_llama3
            d["rope_scaling"] = {"rope_type": "llama3", "factor": f, "low_freq_factor": lo,
                                 "high_freq_factor": hi, "original_max_position_embeddings": orig}
        elif self.rope_linear_factor != 1.0:
            d["rope_scaling"] = {"rope_type": "linear", "factor": self.rope_linear_factor}
        if self.sliding_window is not None:
            d["sliding_window"] = self.sliding_window
            if self.model_type in ("qwen2", "qwen3"):
                d["use_sliding_window"] = True
        return d


def _reject(source: str, key: str, value: Any, why: str) -> None:
    raise UnsupportedConfigError(f"{source}: unsupported config {key}={value!r}: {why}")


def from_hf_dict(d: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Builds a ModelConfig from an HF config dict; `source` names the file in errors."""
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        _reject(source, "model_type", model_type, f"expected one of {SUPPORTED_MODEL_TYPES}")
    unknown = sorted(k for k in d if k not in _IGNORED_KEYS)
    if unknown:
        raise UnsupportedConfigError(
            f"{source}: config keys not supported by cas_jax (would be ignored): {unknown}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
        if key not in d:
            raise UnsupportedConfigError(f"{source}: missing required config key {key!r}")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        _reject(source, "hidden_act", act, "only silu (SwiGLU MLP) is implemented")
    if d.get("mlp_bias"):
        _reject(source, "mlp_bias", True, "MLP biases are not implemented")
    if d.get("pretraining_tp", 1) != 1:
        _reject(source, "pretraining_tp", d["pretraining_tp"], "only 1 is supported")
    num_heads = int(d["num_attention_heads"])
    hidden = int(d["hidden_size"])
    head_dim = d.get("head_dim") or hidden // num_heads

    rope = dict(d.get("rope_parameters") or {})
    scaling = d.get("rope_scaling") or None
    if scaling:
        rope.update(scaling)
    rope_theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    llama3 = None
    linear = 1.0
    if rope_type == "llama3":
        llama3 = (float(rope["factor"]), float(rope["low_freq_factor"]),
                  float(rope["high_freq_factor"]), int(rope["original_max_position_embeddings"]))
    elif rope_type == "linear":
        linear = float(rope["factor"])
    elif rope_type != "default":
        _reject(source, "rope_scaling.rope_type", rope_type, "expected default, linear or llama3")

    sliding = d.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
        sliding = None
    if d.get("layer_types") and len(set(d["layer_types"])) > 1:
        _reject(source, "layer_types", sorted(set(d["layer_types"])),
                "mixed per-layer attention types are not implemented")

    attention_bias = bool(d.get("attention_bias", False))
    if attention_bias and model_type != "llama":
        _reject(source, "attention_bias", True, f"not implemented for {model_type}")
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_llama3=llama3,
        rope_linear_factor=linear,
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias,
        qk_norm=model_type == "qwen3",
        sliding_window=int(sliding) if sliding else None,
        max_position_embeddings=int(d.get("max_position_embeddings", 8192)),
    )


def load_hf_config(folder: str) -> ModelConfig:
    """Reads `<folder>/config.json`."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; an HF model folder needs config.json")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return from_hf_dict(d, source=path)
