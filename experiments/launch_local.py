"""Starts an N-process run of any cas_jax launcher on this host (JAX's distributed runtime).

  python -m experiments.launch_local --num_processes=2 --devices_per_process=2 -- \
      python -m experiments.train_cartridge --data runs/selfstudy --document fr --batch 8

Each process gets the command plus --coordinator=127.0.0.1:PORT --num_processes=N
--process_id=I, and XLA_FLAGS giving it --devices_per_process CPU devices; gloo carries the
collectives between them. Output lines are prefixed with the process index. If one process
fails the others are stopped (their collectives would wait forever), as they are after
--timeout_s. Exits with the first failure's code. On a cluster, run the launcher itself on every
host instead (README "Scaling out").
"""

import sys

from absl import app, flags

from cas_jax import distributed

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_processes", 2, "Processes to start.")
flags.DEFINE_integer("devices_per_process", 1, "CPU devices of each process.")
flags.DEFINE_float("timeout_s", None, "Stop every process after this many seconds.")


def main(argv):
    command = argv[1:]
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise app.UsageError("give the command to run after --, e.g. "
                             "-- python -m experiments.train_cartridge ...")
    if command[0] == "python":
        command[0] = sys.executable
    sys.exit(distributed.launch_local(command, FLAGS.num_processes, FLAGS.devices_per_process,
                                      timeout_s=FLAGS.timeout_s))


if __name__ == "__main__":
    app.run(main)
