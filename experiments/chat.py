"""Answers one prompt with the model reading a set of cartridges instead of the documents.

  python -m experiments.chat --prompt "What is the capital?" \
      --cartridges runs/cartridge_fr/cartridge

The cartridges (directories written by `store.save_cartridge`, e.g. by
`experiments.train_cartridge`) are composed in the order given (`attention.compose`: one sink,
queries where --geometry puts them; by default the geometry the cartridges were trained
under; a routing geometry, `...,relevance=R`, scores each cartridge's document against the
prompt: --documents, or the texts recorded by the store the cartridges are in). A cartridge
made for another model (fingerprint) or with another layout is refused with an error naming it.
"""

import sys

from absl import app, flags

from cas_jax.cartridges import attention, cartridge as cart_lib, store
from cas_jax.documents import corpus, retrieval
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
flags.DEFINE_string("documents", "", "The collection the cartridges stand for ('factbook', "
                    "'factbook_sections' or a folder): a routing geometry (relevance > 0) "
                    "biases each cartridge by its document's relevance to the prompt. Empty = "
                    "the texts recorded by the store holding the first cartridge.")
flags.DEFINE_enum("router", "bm25", ["bm25", "dense"], "Retriever of a routing geometry.")
flags.mark_flag_as_required("prompt")


def _routing(cartridges, geometry) -> list[float] | None:
    """A routing geometry's biases: each cartridge's document (its meta's doc_id) scored
    against the prompt by --router over --documents (or the store's texts), as evaluation
    and the server route."""
    if geometry.relevance <= 0:
        return None
    if len(cartridges) < 2:
        return [0.0] * len(cartridges)  # nothing to route (retrieval.Router.biases)
    if FLAGS.documents:
        texts, source = dict(corpus.load_collection(FLAGS.documents).texts), "--documents"
    else:  # the texts recorded by the store that holds the first cartridge
        first = FLAGS.cartridges[0]
        texts, source = store.documents_of(first), f"the store of {first}"
        if not texts:
            raise ValueError(f"geometry {geometry} routes by relevance, and {source} records "
                             f"no documents: give --documents, the collection the cartridges "
                             f"stand for")
    router = retrieval.Router(retrieval.make_retriever(FLAGS.router, texts), list(texts))
    ids = [c.meta.doc_id for c in cartridges]
    try:
        return router.biases(FLAGS.prompt, ids, geometry.relevance, geometry.relevance_floor)
    except KeyError as e:
        raise ValueError(f"{source}: {e.args[0]}") from None


def main(argv):
    del argv
    model = loading.load_model(FLAGS.model or None)
    try:
        cartridges = [store.load_for_model(p, model) for p in FLAGS.cartridges]
        geometry = (attention.Geometry.parse(FLAGS.geometry) if FLAGS.geometry
                    else attention.geometry_of(cartridges))
        biases = _routing(cartridges, geometry)
    except (cart_lib.CartridgeMismatchError, store.CartridgeStoreError, ValueError) as e:
        sys.exit(f"error: {e}")
    prefix = attention.compose_in_order(cartridges, geometry, biases)
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
