"""Trains a RAG model: ``python train.py --config configs/X.py --workdir DIR [--config.a.b=v]``."""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from rag_jax.training import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Python config file (configs/*.py).")
flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go; a run there resumes.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        train(FLAGS.config, FLAGS.workdir)
    except (ValueError, OSError) as error:  # bad input or files: one line, no traceback
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main)
