"""The data report of a self-study folder, per seed family.

  python -m benchmarks.selfstudy_data --data=runs/study/selfstudy --collection=factbook_sections

Looping answers, grounding (answer 4-grams found in the chunk), context gain (teacher vs
no-context KL, nats per answer token) and the share kept by the synthesis filter; see
`cas_jax.training.selfstudy_data`. Last line: `looping=X grounding=Y context_gain=Z kept=W` (all).
"""

import json
import os

from absl import app, flags

from cas_jax.documents import corpus
from cas_jax.model import loading
from cas_jax.training import dataset, selfstudy_data

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "Synthesis output folder.")
flags.DEFINE_string("collection", "factbook_sections", "Collection the data was made from.")
flags.DEFINE_string("model", "", "HF folder or GGUF file; empty = embedded SmolLM2-135M-Instruct.")
flags.DEFINE_integer("limit", 400, "Conversations sampled for the report (0 = all).")
flags.mark_flag_as_required("data")


def main(argv):
    del argv
    model = loading.load_model(FLAGS.model or None)
    docs = corpus.load_collection(FLAGS.collection, list(dataset.doc_ids(FLAGS.data)))
    rows = selfstudy_data.dataset_report(model, FLAGS.data, docs, FLAGS.limit or None)
    print(selfstudy_data.format_report(rows))
    with open(os.path.join(FLAGS.data, "quality.json"), "w") as f:
        json.dump([r.__dict__ for r in rows], f, indent=1)
    a = rows[-1]
    print(f"looping={a.looping:.3f} grounding={a.grounding_median:.3f} "
          f"context_gain={a.context_gain_mean:.3f} kept={a.kept:.3f}")


if __name__ == "__main__":
    app.run(main)
