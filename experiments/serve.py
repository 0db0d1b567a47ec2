"""Serves a model and a cartridge store over an OpenAI-compatible HTTP API (`cas_jax.server`).

  python -m experiments.serve --store=runs/cas [--model=...] [--host=127.0.0.1] [--port=8000] \
      [--budget_bytes=...] [--max_batch=16]

Then, e.g. with the openai client:
  client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
  client.chat.completions.create(model=<id from /v1/models>, messages=[...],
                                 extra_body={"cartridges": [{"id": "fr-geography"}]})
"""

import os
import sys

from absl import app, flags

from cas_jax import interop, loading, server, store as store_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("store", None, "CartridgeStore directory to serve cartridges from (a store "
                    "root, or a train_collection --store folder such as runs/demo/cas).")
flags.DEFINE_string("model", "", "HF folder or GGUF file; empty = embedded SmolLM2-135M-Instruct.")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
flags.DEFINE_integer("port", 8000, "Port to listen on.")
flags.DEFINE_integer("budget_bytes", 1 << 30, "Device bytes of resident cartridges.")
flags.DEFINE_integer("max_batch", 16, "Most requests in one generate call.")
flags.DEFINE_float("batch_wait_ms", 5.0,
                   "Batch more pending requests until none arrives for this long.")
flags.DEFINE_integer("max_cartridges", 4, "Most cartridges per request.")
flags.DEFINE_integer("max_cartridge_tokens", 0,
                     "Tokens of a bank slot; 0 = the largest cartridge in the store.")
flags.DEFINE_integer("default_max_tokens", 256, "Completion length when a request gives none.")
flags.DEFINE_string("model_id", "", "Model name in the API; empty = the model file's name.")
flags.mark_flag_as_required("store")


def main(argv):
    del argv
    if not os.path.isdir(FLAGS.store):
        sys.exit(f"error: --store={FLAGS.store} is not a directory")
    model = loading.load_model(FLAGS.model or None)
    config = server.ServeConfig(
        budget_bytes=FLAGS.budget_bytes, max_batch=FLAGS.max_batch,
        batch_wait_ms=FLAGS.batch_wait_ms, max_cartridges=FLAGS.max_cartridges,
        max_cartridge_tokens=FLAGS.max_cartridge_tokens or None,
        default_max_tokens=FLAGS.default_max_tokens, model_id=FLAGS.model_id or None)
    try:
        cartridges = interop.open_store(FLAGS.store, model.fingerprint)
    except store_lib.CartridgeNotFoundError as e:
        sys.exit(f"error: --store: {e}")
    server.serve(model, cartridges, config, FLAGS.host, FLAGS.port)


if __name__ == "__main__":
    app.run(main)
