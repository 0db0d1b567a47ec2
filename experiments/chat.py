"""Answers one prompt with the model reading a set of cartridges instead of the documents.

  python -m experiments.chat --prompt "What is the capital?" \
      --cartridges runs/cartridge_fr/cartridge

The cartridges (directories written by `store.save_cartridge`, e.g. by
`experiments.train_cartridge`) are composed in the order given (`attention.compose`: one sink,
queries where --geometry puts them; by default the geometry the cartridges were trained
under). A cartridge made for another model (fingerprint) or with another layout is refused
with an error naming it.
"""

import sys

from absl import app, flags

from cas_jax.cartridges import attention, cartridge as cart_lib, store
from cas_jax.model import loading, rendering, sampling, tokenizer as tok_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("prompt", None, "The user message.")
flags.DEFINE_string("model", "", "HF folder or GGUF file; empty = embedded SmolLM2-135M-Instruct.")
flags.DEFINE_list("cartridges", [], "Cartridge directories, composed in this order.")
flags.DEFINE_integer("max_new_tokens", 256, "Most tokens of the answer.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("geometry", "", "Composition geometry (attention.Geometry spec, e.g. "
                    "'parallel'); empty = the one the cartridges were trained under.")
flags.mark_flag_as_required("prompt")


def main(argv):
    del argv
    model = loading.load_model(FLAGS.model or None)
    try:
        cartridges = [store.load_for_model(p, model) for p in FLAGS.cartridges]
        geometry = (attention.Geometry.parse(FLAGS.geometry) if FLAGS.geometry
                    else attention.geometry_of(cartridges))
    except (cart_lib.CartridgeMismatchError, store.CartridgeStoreError, ValueError) as e:
        sys.exit(f"error: {e}")
    prefix = attention.compose_in_order(cartridges, geometry)
    # The one rendering (cas_jax.model.rendering): cartridges stand where the document block stood,
    # with nothing between them and the conversation.
    prompt = rendering.rendering_for(model.tokenizer).conversation(
        [{"role": "user", "content": FLAGS.prompt}])
    params = sampling.SamplingParams(
        max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_p=FLAGS.top_p,
        stop_ids=tuple(tok_lib.stop_token_ids(model.tokenizer)))
    (answer,) = sampling.generate(model.params, model.config, [prompt], params, prefix=prefix,
                                  seed=FLAGS.seed)
    print(model.tokenizer.decode(answer, skip_special_tokens=True).strip())


if __name__ == "__main__":
    app.run(main)
