"""Serves a model and a cartridge store over an OpenAI-compatible HTTP API
(`cas_jax.serving.server`).

  python -m experiments.serve --store=runs/cas [--model=...] [--host=127.0.0.1] [--port=8000] \
      [--engine=continuous|static] [--geometry=parallel] [--budget_bytes=...] [--max_batch=16] \
      [--documents=factbook_sections]  # what routing scores; default the store's own texts

Then, e.g. with the openai client:
  client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
  client.chat.completions.create(model=<id from /v1/models>, messages=[...],
                                 extra_body={"cartridges": [{"id": "fr-geography"}]})
"""

import json
import os
import sys

from absl import app, flags

from cas_jax.cartridges import attention, store as store_lib
from cas_jax.documents import corpus
from cas_jax.interop import convert as interop
from cas_jax.model import loading
from cas_jax.serving import engine as serving_engine, server

FLAGS = flags.FLAGS
flags.DEFINE_string("store", None, "CartridgeStore directory to serve cartridges from (a store "
                    "root, or a train_collection --store folder such as runs/demo/cas).")
flags.DEFINE_string("model", "", "HF folder or GGUF file; empty = embedded SmolLM2-135M-Instruct.")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
flags.DEFINE_integer("port", 8000, "Port to listen on.")
flags.DEFINE_enum("engine", "continuous", list(serving_engine.ENGINES),
                  "continuous: requests join the running batch at the next decode step; "
                  "static: request-level batches (kept for comparison).")
flags.DEFINE_string("geometry", "",
                    "How a request's cartridges are composed (attention.Geometry.parse): "
                    "serial or parallel, optionally ',temperature=X,scale=Y,count_power=Z,"
                    "relevance=R,relevance_floor=F,effective_count=0|1,routed_sink=0|1' "
                    "(the attention module doc). Default: the one the store's "
                    "cartridges were trained under. A routing geometry (relevance > 0) scores "
                    "documents: --documents, or the store's own.")
flags.DEFINE_string("documents", "", "The collection the cartridges stand for ('factbook', "
                    "'factbook_sections' or a folder; corpus.load_collection): a routing "
                    "geometry biases a request's cartridges by their documents' relevance to "
                    "its last user message. Empty = the texts the store records (every "
                    "trained or initialised cartridge's document).")
flags.DEFINE_enum("router", "bm25", ["bm25", "dense"], "Retriever that scores the documents for "
                  "a routing geometry.")
flags.DEFINE_integer("budget_bytes", 1 << 30, "Device bytes of resident cartridges.")
flags.DEFINE_integer("max_batch", 16, "Most requests decoding at once (static: per call).")
flags.DEFINE_float("batch_wait_ms", 5.0, "Static engine: batch more pending requests until "
                   "none arrives for this long.")
flags.DEFINE_integer("max_cartridges", 4, "Most cartridges per request.")
flags.DEFINE_integer("max_cartridge_tokens", 0,
                     "Tokens of a bank slot; 0 = the largest cartridge in the store.")
flags.DEFINE_integer("max_cache_tokens", 0, "Continuous engine: rows x KV slots per row of the "
                     "pool; 0 = max(context window, max_batch * 1024).")
flags.DEFINE_integer("prefill_tokens_per_step", 512, "Continuous engine: prompt tokens "
                     "admitted between two decode steps.")
flags.DEFINE_integer("prefill_chunk", 512, "Continuous engine: a prompt longer than this (a "
                     "multiple of 64) is prefilled in chunks of it, one per decode step.")
flags.DEFINE_bool("warmup", True, "Continuous engine: compile the common shapes at start-up, "
                  "in the background.")
flags.DEFINE_bool("escape_special_tokens", False, "Tokenise message text that spells a special "
                  "token (<|im_end|>) as plain text (a request's escape_special_tokens field "
                  "overrides it).")
flags.DEFINE_integer("max_body_bytes", 1 << 20, "Request bodies over this many bytes get 413.")
flags.DEFINE_integer("default_max_tokens", 256, "Completion length when a request gives none.")
flags.DEFINE_string("model_id", "", "Model name in the API; empty = the model file's name.")
flags.mark_flag_as_required("store")


def _check_marker(root: str) -> None:
    """Exits unless root/STORE.json (when present) is a store of the format this code reads."""
    marker = os.path.join(root, "STORE.json")
    if not os.path.exists(marker):
        return
    try:
        with open(marker) as f:
            fmt = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        sys.exit(f"error: {marker} is unreadable ({type(e).__name__}: {e})")
    fmt = fmt.get("format") if isinstance(fmt, dict) else None
    if fmt != store_lib.STORE_FORMAT:
        sys.exit(f"error: {marker} is a store of format {fmt!r}; this cas_jax serves stores of "
                 f"format {store_lib.STORE_FORMAT!r}")


def open_store(path: str, fingerprint: str) -> store_lib.CartridgeStore:
    """The store at `path` (a store root or a train_collection folder); exits with a one-line
    error, not a traceback, if there is none or it cannot be read."""
    if not os.path.isdir(path):
        sys.exit(f"error: --store={path} is not a directory")
    for root in (path, os.path.join(path, "cartridges")):
        _check_marker(root)
    try:
        return interop.open_store(path, fingerprint)
    except (store_lib.CartridgeStoreError, OSError) as e:
        sys.exit(f"error: --store={path}: {e}")


def config_from_flags() -> serving_engine.ServeConfig:
    try:
        geometry = attention.Geometry.parse(FLAGS.geometry) if FLAGS.geometry else None
    except ValueError as e:
        raise app.UsageError(f"--geometry: {e}")
    documents = None
    if FLAGS.documents:
        try:
            documents = dict(corpus.load_collection(FLAGS.documents).texts)
        except (ValueError, OSError) as e:
            raise app.UsageError(f"--documents={FLAGS.documents}: {e}")
    return serving_engine.ServeConfig(
        budget_bytes=FLAGS.budget_bytes, engine=FLAGS.engine, max_batch=FLAGS.max_batch,
        batch_wait_ms=FLAGS.batch_wait_ms, max_cartridges=FLAGS.max_cartridges,
        max_cartridge_tokens=FLAGS.max_cartridge_tokens or None,
        default_max_tokens=FLAGS.default_max_tokens, model_id=FLAGS.model_id or None,
        geometry=geometry, documents=documents, router=FLAGS.router,
        max_cache_tokens=FLAGS.max_cache_tokens or None,
        prefill_tokens_per_step=FLAGS.prefill_tokens_per_step,
        prefill_chunk=FLAGS.prefill_chunk, warmup=FLAGS.warmup,
        escape_special_tokens=FLAGS.escape_special_tokens, max_body_bytes=FLAGS.max_body_bytes)


def main(argv):
    del argv
    config = config_from_flags()
    for root in (FLAGS.store, os.path.join(FLAGS.store, "cartridges")):
        _check_marker(root)  # before the model loads, so a bad store fails at once
    model = loading.load_model(FLAGS.model or None)
    store = open_store(FLAGS.store, model.fingerprint)
    try:
        app_ = server.make_app(model, store, config)
    except ValueError as e:  # e.g. cartridges trained under different geometries
        sys.exit(f"error: --store={FLAGS.store}: {e}")
    server.run_app(app_, FLAGS.host, FLAGS.port)


if __name__ == "__main__":
    app.run(main)
