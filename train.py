"""Trains a RAG model: ``python train.py --config configs/X.py --workdir DIR [--config.a.b=v]``.

Several processes (a TPU pod slice, GPU hosts): run the same command on every host with
``--distributed`` (``jax.distributed.initialize()`` finds the coordinator itself on TPU and
under SLURM), or name it: ``--coordinator=HOST:PORT --num_processes=N --process_id=I``.
"""

import logging
import signal
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from rag_jax._cli import parse_flags
from rag_jax.training import NonFiniteError, StoppedError, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Python config file (configs/*.py).")
flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go; a run there resumes.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0 (implies --distributed).")
flags.DEFINE_integer("num_processes", None, "Processes in a --coordinator run.")
flags.DEFINE_integer("process_id", None, "This process's index in a --coordinator run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("rag_jax").setLevel(logging.INFO)  # ours; orbax and absl say too much
    absl_logging.set_verbosity(absl_logging.WARNING)
    if FLAGS.distributed or FLAGS.coordinator:
        # CPU processes exchange collectives over gloo (GPU and TPU use their own).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    try:
        train(FLAGS.config, FLAGS.workdir)
    except (ValueError, OSError, NonFiniteError) as error:  # one line, no traceback
        sys.exit(f"error: {error}")
    except StoppedError as stopped:  # SIGINT or SIGTERM: the step is saved; not a finished run
        print(f"train.py: {stopped}", file=sys.stderr)
        sys.exit(128 + signal.Signals[stopped.signal_name].value)
    except KeyboardInterrupt:  # Ctrl-C before the first step, or a second one
        print(
            "train.py: interrupted before a save; run the same command to resume from the "
            "latest checkpoint",
            file=sys.stderr,
        )
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
