"""Tokenizers and chat templates, through transformers/tokenizers (never a model hub).

An HF folder's tokenizer files load directly. A GGUF file's tokenizer and chat template are
converted from its metadata by transformers once, then cached as an HF tokenizer folder under
`cache_dir()` (the conversion takes seconds; the cached copy loads in well under one).
"""

from __future__ import annotations

import hashlib
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def cache_dir() -> str:
    """Root of cas_jax's caches: $CAS_JAX_CACHE, else ~/.cache/cas_jax."""
    return os.environ.get("CAS_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                            "cas_jax")


def file_key(path: str) -> str:
    """The name of a GGUF file's converted tokenizer under `cache_dir()/tokenizers`: a hash of
    its absolute path, size and modification time (a changed file gets a new key)."""
    st = os.stat(path)
    return hashlib.sha256(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()
                          ).hexdigest()[:16]


def load_tokenizer(path: str):
    """A transformers tokenizer for an HF folder or a GGUF file, with its chat template."""
    from transformers import AutoTokenizer

    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, f))
                   for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            raise FileNotFoundError(f"{path}: no tokenizer.json/tokenizer_config.json found")
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such model file or folder")
    cached = os.path.join(cache_dir(), "tokenizers", file_key(path))
    if os.path.isfile(os.path.join(cached, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(cached, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                        gguf_file=os.path.basename(path), local_files_only=True)
    tmp = cached + f".tmp{os.getpid()}"
    tok.save_pretrained(tmp)
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    try:
        os.replace(tmp, cached)
    except OSError:  # another process cached it first
        pass
    return tok


def tokenizer_hash(tokenizer) -> str:
    """Short hash of the vocabulary: two tokenizers with the same hash map text identically."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def encode_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True
                ) -> list[int]:
    """Token ids of a chat (list of {"role", "content"}) under the tokenizer's chat template."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end an assistant turn: eos and the chat template's end-of-turn token."""
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        i = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(i, int) and i != tokenizer.unk_token_id and i >= 0:
            ids.add(i)
    return sorted(i for i in ids if i is not None)
