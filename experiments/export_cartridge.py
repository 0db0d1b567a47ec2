"""Exports cas_jax cartridges for the PyTorch reference, Tokasaurus, Hugging Face PEFT or vLLM.

  python -m experiments.export_cartridge --store runs/cas --doc_id fr --out runs/fr.pt
  python -m experiments.export_cartridge --store runs/cas --doc_id fr --format tokasaurus \\
      --out tokasaurus_cartridges/fr          # <cartridge_dir>/<id>/{cartridge.pt,config.yaml}
  python -m experiments.export_cartridge --store runs/cas --doc_id fr,gm --format peft \\
      --dtype bf16 --out runs/fr_gm_peft      # adapter_model.safetensors + adapter_config.json
  python -m experiments.export_cartridge --cartridge runs/cartridge_fr --format vllm_prefix \\
      --out runs/fr.safetensors

The source is `--doc_id` of `--store` (a CartridgeStore root or a train_collection --store
folder), or `--cartridge`: a cartridge directory as `experiments.chat --cartridges` reads, or a
train_cartridge --output_dir. Several ids (or directories), comma-separated, go into one file
with one attention sink (the serial composition). The cartridges must have been made for
`--model` (fingerprint and shape). Layouts and each consumer's semantics: `cas_jax.interop.convert`.
"""

import sys

from absl import app, flags

from cas_jax.cartridges import cartridge as cart_lib, store
from cas_jax.interop import convert as interop
from cas_jax.model import loading

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "", "HF folder or GGUF file; empty = embedded SmolLM2-135M-Instruct.")
flags.DEFINE_string("store", None, "Cartridge store (with --doc_id).")
flags.DEFINE_list("doc_id", [], "Cartridge id(s) in --store; several are composed into one file.")
flags.DEFINE_list("cartridge", [], "Cartridge directory(ies) or train_cartridge output folder(s).")
flags.DEFINE_enum("format", "reference", interop.FORMATS,
                  "reference: the .pt file; tokasaurus: the cartridge's directory <dir>/<id> "
                  "(cartridge.pt + config.yaml); peft: the adapter folder; vllm_prefix: a "
                  ".safetensors file.")
flags.DEFINE_string("out", None, "The file or directory to write (see --format).")
flags.DEFINE_enum("dtype", "keep", list(interop.DTYPES), "keep the stored dtype, or cast.")
flags.DEFINE_enum("names", "frozen", list(interop.FROZEN_NAMES),
                  "Frozen token lists in .pt files: frozen_* (the reference since August 2025) "
                  "or fixed_* (before).")
flags.DEFINE_integer("page_size", interop.TOKASAURUS_PAGE_SIZE,
                     "Tokasaurus's KV page size: --format=tokasaurus refuses a cartridge whose "
                     "frozen + trainable tokens are not a multiple of it.")
flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")
flags.mark_flag_as_required("out")


def main(argv):
    del argv
    if bool(FLAGS.store) == bool(FLAGS.cartridge) or bool(FLAGS.store) != bool(FLAGS.doc_id):
        raise app.UsageError("give either --store and --doc_id, or --cartridge")
    model = loading.load_model(FLAGS.model or None)
    try:
        c = interop.export_cartridge(
            FLAGS.out, model_fingerprint=model.fingerprint,
            expected_shape=interop.kv_shape(model.config), format=FLAGS.format,
            store=FLAGS.store, doc_ids=FLAGS.doc_id, cartridge_dirs=FLAGS.cartridge,
            dtype=FLAGS.dtype, names=FLAGS.names, page_size=FLAGS.page_size,
            overwrite=FLAGS.overwrite)
    except (cart_lib.CartridgeMismatchError, store.CartridgeStoreError, FileExistsError,
            ValueError) as e:
        sys.exit(f"error: {e}")
    trainable = c.num_tokens - c.meta.num_frozen
    print(f"wrote {FLAGS.out} ({FLAGS.format}): {c.keys.shape[0]} layers, {c.meta.num_frozen} "
          f"frozen + {trainable} trainable tokens, {c.keys.dtype}")
    if FLAGS.format == "reference" and c.num_tokens % interop.TOKASAURUS_PAGE_SIZE:
        print(f"note: Tokasaurus serves frozen + trainable tokens in whole pages of "
              f"{interop.TOKASAURUS_PAGE_SIZE} and would drop the last "
              f"{c.num_tokens % interop.TOKASAURUS_PAGE_SIZE}; --format=tokasaurus checks this")


if __name__ == "__main__":
    app.run(main)
