"""Multi-process runs on JAX's own runtime: `jax.distributed`, a global mesh, gloo on CPU.

Every process runs the same program. `initialize` joins it to the others before anything
touches a device; afterwards `jax.devices()` lists every process's devices and `train.make_mesh`
builds the global 1-D "data" mesh over them. What each job does per process:

  training (`train.train`)     each process reads only its rows of every global batch
                               (`dataset.make_train_iterator`) and feeds them with
                               `jax.make_array_from_process_local_data`; the cartridge and Adam
                               state are replicated, Orbax checkpoints are written collectively
  CAS (`train_collection`)     every process pages the step's cartridges through its own
                               BudgetManager, spilling evictions to its own pending store; at a
                               checkpoint the owner of each cartridge (`owner`) and only it
                               writes it into the shared store
  synthesis (`run_shard`)      process i writes shard i of num_processes (no collectives)

Flags (`define_flags`, used by the launchers): --coordinator=HOST:PORT --num_processes=N
--process_id=I, or --distributed to let `jax.distributed.initialize()` find them itself (SLURM,
Open MPI, Kubernetes, Cloud TPU pods; JAX_COORDINATOR_ADDRESS is read too). On CPU the
cross-process collectives are gloo's, so N processes on one machine are a real multi-process
run. `launch_local` (and `experiments.launch_local`) starts N such processes on this host.

A hung run (a collective one process never reaches) can be asked where it stands: every
process that joined one prints all its threads' Python stacks on SIGUSR1 (`kill -USR1 PID`),
and `wait_all` does that before it ends a run at its timeout.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Sequence

import jax
import numpy as np
from absl import flags

STACKS_SIGNAL = signal.SIGUSR1  # a process in a multi-process run prints its stacks on it


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False,
               timeout_s: int = 120) -> bool:
    """Joins this process to a multi-process run; returns whether one was joined.

    Nothing given (and auto False, JAX_COORDINATOR_ADDRESS unset): a single-process run, no-op.
    coordinator "HOST:PORT" with num_processes and process_id: explicit. auto, or only some of
    them: `jax.distributed.initialize` fills the rest from the cluster environment. Must run
    before any device is used; calling it again is a no-op.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if jax.distributed.is_initialized() or not (
            auto or coordinator or num_processes or process_id is not None):
        return jax.distributed.is_initialized()
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id must be in [0, {num_processes}), got {process_id}")
    if coordinator is not None and (":" not in coordinator
                                    or not coordinator.rsplit(":", 1)[1].isdigit()):
        raise ValueError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               initialization_timeout=timeout_s)
    faulthandler.register(STACKS_SIGNAL, all_threads=True)  # where a hung process stands
    return True


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """--coordinator, --num_processes, --process_id, --distributed (see the module doc)."""
    flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0's coordinator service "
                        "(multi-process run; default: $JAX_COORDINATOR_ADDRESS).",
                        flag_values=flag_values)
    flags.DEFINE_integer("num_processes", None, "Processes in the multi-process run.",
                         flag_values=flag_values)
    flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).",
                         flag_values=flag_values)
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() and let it read "
                      "the cluster environment (SLURM, Open MPI, TPU pods).",
                      flag_values=flag_values)


def initialize_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> bool:
    """`initialize` with the `define_flags` flags; returns whether a multi-process run began."""
    try:
        return initialize(flag_values.coordinator, flag_values.num_processes,
                          flag_values.process_id, auto=flag_values.distributed)
    except ValueError as e:
        raise flags.ValidationError(str(e)) from e


def is_primary() -> bool:
    """True on process 0, the one that writes run-level files (metrics, run state)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier `name` (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def allgather_rows(x: np.ndarray) -> np.ndarray:
    """Concatenates every process's `x` on axis 0, in process order (x itself with one)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def owner(doc_id: str, num_processes: int | None = None) -> int:
    """The one process that writes cartridge `doc_id` into a shared store (CRC-32 of the id
    modulo the process count: stable across runs and hosts, spreads the writes)."""
    n = jax.process_count() if num_processes is None else num_processes
    return zlib.crc32(doc_id.encode("utf-8")) % n


def local_rows(global_batch: int, index: int | None = None,
               count: int | None = None) -> slice:
    """The rows of a global batch that process `index` of `count` holds: a contiguous block,
    in process order (the order of the global mesh's devices)."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    if global_batch % count:
        raise ValueError(f"global batch {global_batch} is not a multiple of {count} processes")
    per = global_batch // count
    return slice(index * per, (index + 1) * per)


# ---------------------------------------------------------------------- local launcher

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local(argv: Sequence[str], num_processes: int, devices_per_process: int = 1, *,
                port: int | None = None, env: dict[str, str] | None = None,
                ) -> list[subprocess.Popen]:
    """Starts `argv` num_processes times on this host as one multi-process run.

    Process i gets `--coordinator=127.0.0.1:PORT --num_processes=N --process_id=i` appended and
    XLA_FLAGS giving it `devices_per_process` host (CPU) devices. stdout and stderr are merged
    and piped (text); each process leads its own process group, so `stop` ends its children.
    """
    port = port or free_port()
    procs = []
    for i in range(num_processes):
        penv = dict(os.environ if env is None else env)
        xla = [f for f in penv.get("XLA_FLAGS", "").split()
               if not f.startswith("--xla_force_host_platform_device_count")]
        penv["XLA_FLAGS"] = " ".join(
            xla + [f"--xla_force_host_platform_device_count={devices_per_process}"])
        penv.pop("JAX_COORDINATOR_ADDRESS", None)
        cmd = list(argv) + [f"--coordinator=127.0.0.1:{port}",
                            f"--num_processes={num_processes}", f"--process_id={i}"]
        procs.append(subprocess.Popen(cmd, env=penv, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    return procs


def stop(procs: Sequence[subprocess.Popen], sig: int = signal.SIGKILL, group: bool = True
         ) -> None:
    """Sends `sig` to every still-running process (and, with `group`, its process group)."""
    for p in procs:
        if p.poll() is None:
            try:
                (os.killpg if group else os.kill)(p.pid, sig)
            except ProcessLookupError:
                pass


def _ask_for_stacks(procs: Sequence[subprocess.Popen], grace_s: float = 3.0) -> None:
    """Sends `STACKS_SIGNAL` to every running process and gives them `grace_s` to print."""
    stop(procs, STACKS_SIGNAL, group=False)
    time.sleep(grace_s)


def wait_all(procs: Sequence[subprocess.Popen], timeout_s: float | None = None,
             echo=None) -> tuple[list[int], list[str]]:
    """Waits for every process; returns (return codes, outputs).

    A process that fails (non-zero exit) brings the others down after a 10 s grace, since
    their collectives would wait for it forever; `timeout_s` ends them all (return code -9),
    after asking each for its stacks (`STACKS_SIGNAL`; they land in its output) so that a
    hang says where it was. `echo(i, line)` sees every output line as it arrives.
    """
    outputs: list[list[str]] = [[] for _ in procs]

    def pump(i: int, p: subprocess.Popen) -> None:
        for line in p.stdout:
            outputs[i].append(line)
            if echo is not None:
                echo(i, line)

    pumps = [threading.Thread(target=pump, args=(i, p), daemon=True)
             for i, p in enumerate(procs)]
    for t in pumps:
        t.start()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    failed_at = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if deadline is not None and now > deadline:
            _ask_for_stacks(procs)
            stop(procs)
            break
        if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
            failed_at = now
        if failed_at is not None and now - failed_at > 10:
            stop(procs)
            break
        time.sleep(0.05)
    codes = [p.wait() for p in procs]
    for t in pumps:
        t.join(timeout=5)
    return codes, ["".join(o) for o in outputs]


def launch_local(argv: Sequence[str], num_processes: int, devices_per_process: int = 1, *,
                 timeout_s: float | None = None) -> int:
    """Runs `argv` as an N-process run on this host (`start_local`), printing each process's
    lines prefixed with "[i]"; returns 0 if every process succeeded, else the first failure's
    return code."""
    procs = start_local(argv, num_processes, devices_per_process)
    lock = threading.Lock()

    def echo(i, line):
        with lock:
            sys.stdout.write(f"[{i}] {line}")
            sys.stdout.flush()

    try:
        codes, _ = wait_all(procs, timeout_s, echo)
    except KeyboardInterrupt:
        stop(procs)
        raise
    return next((c for c in codes if c != 0), 0)
