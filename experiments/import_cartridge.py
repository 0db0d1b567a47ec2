"""Imports a reference, Tokasaurus, PEFT or vLLM-prefix cartridge into a cas_jax cartridge store.

  python -m experiments.import_cartridge --path cartridge.pt --store runs/imported --doc_id fr
  python -m experiments.import_cartridge --format tokasaurus --path cartridges/fr \\
      --store runs/imported --doc_id fr
  python -m experiments.import_cartridge --format peft --path runs/fr_peft --store runs/cas \\
      --doc_id fr

`--path` is what `experiments.export_cartridge --out` names for the format (reference .pt files
with frozen_* or the older fixed_* names). `--store` is a CartridgeStore root or a
train_collection --store folder (its cartridges go to the `cartridges/` store there, so
`experiments.train_collection` can keep training them); a new folder becomes a store root. The
file must fit `--model` (layers, kv heads, head dim); the cartridge is stamped with the model's
fingerprint, its frozen tokens stay frozen, and it is stored at step 0 with a fresh Adam state
(`--nowith_opt_state`: none, inference only).
"""

import sys

from absl import app, flags

from cas_jax.cartridges import cartridge as cart_lib, store
from cas_jax.interop import convert as interop
from cas_jax.model import loading

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "", "HF folder or GGUF file; empty = embedded SmolLM2-135M-Instruct.")
flags.DEFINE_enum("format", "reference", interop.FORMATS, "The file's format.")
flags.DEFINE_string("path", None, "The file or directory to read (see --format).")
flags.DEFINE_alias("pt", "path")
flags.DEFINE_string("store", None, "Cartridge store to save into (created if absent).")
flags.DEFINE_string("doc_id", None, "Cartridge id to save it as.")
flags.DEFINE_enum("dtype", "keep", list(interop.DTYPES), "keep the file's dtype, or cast.")
flags.DEFINE_bool("with_opt_state", True, "Store a fresh optimizer state (for training on).")
flags.DEFINE_bool("overwrite", False, "Replace --doc_id if the store already has it.")
flags.mark_flags_as_required(["path", "store", "doc_id"])


def main(argv):
    del argv
    model = loading.load_model(FLAGS.model or None)
    try:
        c = interop.import_cartridge(
            FLAGS.path, FLAGS.store, FLAGS.doc_id, model_fingerprint=model.fingerprint,
            expected_shape=interop.kv_shape(model.config), format=FLAGS.format,
            dtype=FLAGS.dtype, with_opt_state=FLAGS.with_opt_state, overwrite=FLAGS.overwrite)
    except (cart_lib.CartridgeMismatchError, interop.CartridgeFormatError,
            store.CartridgeStoreError, FileExistsError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"stored {FLAGS.doc_id!r} in {FLAGS.store}: {c.keys.shape[0]} layers, "
          f"{c.meta.num_frozen} frozen + {c.num_tokens - c.meta.num_frozen} trainable tokens, "
          f"{c.keys.dtype}")


if __name__ == "__main__":
    app.run(main)
