"""Evaluates a trained RAG model on a QA file.

``python eval.py --workdir DIR --data qa.jsonl [--config configs/X.py] [--index DIR]
[--decode token|thorough|fast] [--beams N] [--n-docs K] [--retrieval-only] [--lenient]
[--match string|regex]``
(``--n_docs`` and ``--retrieval_only`` work too)

The model, its config and its index come from the workdir (``DIR/config.json``, the latest
checkpoint). ``--config`` is optional: a config given is compared with the recorded one and
refused, naming the field, where it differs in what changes the model, p(z|x) or the
generator's inputs (``rag_jax.checkpoints.check_eval_config``). The index (the config's
``data.index`` or ``--index``) is checked against the model's query encoder, the document
encoder it was trained with, and K.

Writes ``eval_settings.json``, ``predictions.jsonl`` and ``metrics.json`` to ``--out``
(default ``DIR/eval/<data file name>``). Re-running the same evaluation resumes after the
last question written; a run whose settings, checkpoint step, index or data file differ from
those recorded in ``eval_settings.json`` is refused with one line naming what differs (give
it another ``--out``). ``--decode`` defaults to the model's marginalization: "token" for
RAG-Token, "thorough" for RAG-Sequence. Scores: ``em``/``f1`` are SQuAD v1.1's,
``recall@k`` DPR's ``has_answer`` (``--match regex``: the answers are patterns, as
CuratedTrec's); ``--lenient`` adds the ``*_lenient`` scores beside them.
"""

import json
import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from rag_jax._cli import parse_flags
from rag_jax.data import read_qa
from rag_jax.evaluation import EvalSettings, Evaluator, evaluate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "The config the model was trained with (default: the workdir's record)."
)
flags.DEFINE_string("workdir", None, "The training workdir (its latest checkpoint is used).")
flags.DEFINE_string("data", None, "QA file: JSONL / DPR json / TSV.")
flags.DEFINE_string("index", None, "Another index directory to answer from (hot swap).")
flags.DEFINE_enum(
    "decode", None, ["token", "thorough", "fast"],
    "Decoding mode (default: token for RAG-Token, thorough for RAG-Sequence models).",
)  # fmt: skip
flags.DEFINE_integer("beams", 4, "Beam size (1: greedy).")
flags.DEFINE_integer("n_docs", None, "Documents per question (default: the model's K).")
flags.DEFINE_integer("max_length", 20, "Maximum generated tokens, start token included.")
flags.DEFINE_integer("batch_size", 8, "Questions per batch.")
flags.DEFINE_bool("retrieval_only", False, "Only retrieve and score recall@k.")
flags.DEFINE_bool(
    "lenient", False, "Also report lenient scores (*_lenient) beside SQuAD's and DPR's."
)
flags.DEFINE_enum(
    "match", "string", ["string", "regex"],
    "How recall@k finds an answer in a passage (DPR's has_answer): token runs, or the answers "
    "as regular expressions (CuratedTrec).",
)  # fmt: skip
flags.DEFINE_string("out", None, "Output directory.")
# The spellings of rag_jax.ask and of the usage line, beside absl's underscores.
flags.DEFINE_alias("n-docs", "n_docs")
flags.DEFINE_alias("retrieval-only", "retrieval_only")
flags.mark_flags_as_required(["workdir", "data"])


def main(argv):
    del argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("rag_jax").setLevel(logging.INFO)  # ours; orbax and absl say too much
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        settings = EvalSettings(
            decode=FLAGS.decode, beams=FLAGS.beams, n_docs=FLAGS.n_docs,
            max_length=FLAGS.max_length, batch_size=FLAGS.batch_size,
            retrieval_only=FLAGS.retrieval_only, lenient=FLAGS.lenient, match=FLAGS.match,
        )  # fmt: skip
        read_qa(FLAGS.data)  # a missing, malformed or empty data file: refused before loading
        evaluator = Evaluator.from_workdir(
            FLAGS.workdir, settings, config=FLAGS.config, index=FLAGS.index
        )
        out = FLAGS.out or f"{FLAGS.workdir}/eval/{FLAGS.data.rsplit('/', 1)[-1]}"
        metrics = evaluate(evaluator, FLAGS.data, out, progress=True)
    except (ValueError, OSError) as error:  # bad input or files: one line, no traceback
        sys.exit(f"error: {error}")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
