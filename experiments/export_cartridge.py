"""Exports a cas_jax cartridge as a reference (PyTorch Cartridges / Tokasaurus) `cartridge.pt`.

  python -m experiments.export_cartridge --store runs/cas --doc_id fr --out runs/fr.pt
  python -m experiments.export_cartridge --cartridge runs/cartridge_fr --out runs/fr.pt

The source is `--doc_id` of `--store` (a CartridgeStore root or a train_collection --store
folder), or `--cartridge`: a cartridge directory as `experiments.chat --cartridges` reads, or a
train_cartridge --output_dir. The cartridge must have been made for `--model` (fingerprint and
shape); the file layout is described in `cas_jax.interop`.
"""

import sys

from absl import app, flags

from cas_jax import cartridge as cart_lib, interop, loading, store

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "", "HF folder or GGUF file; empty = embedded SmolLM2-135M-Instruct.")
flags.DEFINE_string("store", None, "Cartridge store (with --doc_id).")
flags.DEFINE_string("doc_id", None, "Cartridge id in --store.")
flags.DEFINE_string("cartridge", None, "Cartridge directory or train_cartridge output folder.")
flags.DEFINE_string("out", None, "The .pt file to write.")
flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")
flags.mark_flag_as_required("out")


def main(argv):
    del argv
    if (FLAGS.store is None) == (FLAGS.cartridge is None) or (
            (FLAGS.store is None) != (FLAGS.doc_id is None)):
        raise app.UsageError("give either --store and --doc_id, or --cartridge")
    model = loading.load_model(FLAGS.model or None)
    try:
        c = interop.export_cartridge(
            FLAGS.out, model_fingerprint=model.fingerprint,
            expected_shape=interop.kv_shape(model.config), store=FLAGS.store,
            doc_id=FLAGS.doc_id, cartridge_dir=FLAGS.cartridge, overwrite=FLAGS.overwrite)
    except (cart_lib.CartridgeMismatchError, store.CartridgeStoreError, FileExistsError) as e:
        sys.exit(f"error: {e}")
    trainable = c.num_tokens - c.meta.num_frozen
    print(f"wrote {FLAGS.out}: {c.keys.shape[0]} layers, {c.meta.num_frozen} frozen + "
          f"{trainable} trainable tokens, {c.keys.dtype}")
    if trainable % 16:
        print(f"note: Tokasaurus serves the trainable tokens truncated to a multiple of 16 "
              f"({trainable - trainable % 16})")


if __name__ == "__main__":
    app.run(main)
