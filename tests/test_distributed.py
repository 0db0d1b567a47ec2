"""Multi-process runs with real processes on 127.0.0.1 (JAX distributed runtime, gloo on CPU).

Each run starts `distributed_worker.py` N times through `cas_jax.distributed.start_local`, every
process with its own host devices, and ends all of them after a timeout, so a hung collective
cannot hang the suite. Tolerance: 2 processes x 2 devices against 1 process x 4 devices is the
same global batch on the same 4-device mesh, but the cross-process all-reduce (gloo) may sum
in another order than the in-process one: per-step losses agree to rtol 1e-5 and cartridges to
atol 1e-5 (f32 reduction order; measured differences were far below that).
"""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from cas_jax import distributed
from cas_jax.cartridges.store import CartridgeStore
from cas_jax.training import dataset

sys.path.insert(0, os.path.dirname(__file__))
import distributed_worker as worker  # noqa: E402

pytestmark = pytest.mark.slow  # several processes, gloo collectives, kills

WORKER = [sys.executable, os.path.join(os.path.dirname(__file__), "distributed_worker.py")]
TIMEOUT_S = 240


def _run(args, num_processes, devices, timeout_s=TIMEOUT_S):
    procs = distributed.start_local(WORKER + args, num_processes, devices)
    codes, outputs = distributed.wait_all(procs, timeout_s)
    assert codes == [0] * num_processes, "\n".join(
        f"--- process {i} (exit {c}) ---\n{o[-3000:]}" for i, (c, o) in
        enumerate(zip(codes, outputs)))
    return outputs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mp") / "data")
    worker.write_dataset(path)
    return path


def test_two_processes_train_like_one_process_with_all_devices(data, tmp_path):
    _run(["--job=train", f"--data={data}", f"--out={tmp_path / 'one'}"], 1, 4)
    # The 2-process run goes through the launcher script, as a user starts one.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.launch_local", "--num_processes=2",
         "--devices_per_process=2", f"--timeout_s={TIMEOUT_S}", "--"] + WORKER +
        ["--job=train", f"--data={data}", f"--out={tmp_path / 'two'}"],
        cwd=repo, capture_output=True, text=True, timeout=TIMEOUT_S + 30)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[1] reported step 6" in proc.stdout
    one, two = np.load(tmp_path / "one" / "result.npz"), np.load(tmp_path / "two" / "result.npz")
    assert (int(one["processes"]), int(one["devices"])) == (1, 4)
    assert (int(two["processes"]), int(two["devices"])) == (2, 4)
    assert len(two["losses"]) == 6 and np.all(np.diff(two["losses"]) != 0)
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    np.testing.assert_allclose(two["keys"], one["keys"], atol=1e-5)
    np.testing.assert_allclose(two["values"], one["values"], atol=1e-5)


def _store(root):
    store = CartridgeStore(os.path.join(root, "cartridges"), "tiny-model")
    out = {}
    for d in worker.DOCS:
        c, opt, step = store.load(d, read_opt_state=False)
        out[d] = (c.keys, c.values, step)
    return out


def _assert_stores_close(a, b, atol):
    for d in worker.DOCS:
        assert a[d][2] == b[d][2], f"cartridge {d}: step {a[d][2]} vs {b[d][2]}"
        np.testing.assert_allclose(a[d][0], b[d][0], atol=atol, err_msg=d)
        np.testing.assert_allclose(a[d][1], b[d][1], atol=atol, err_msg=d)


def test_two_process_cas_training_matches_one_process_and_survives_a_kill(data, tmp_path):
    steps = 12
    roots = {}
    for name in ("one", "two", "killed"):
        roots[name] = str(tmp_path / name)
        worker.init_store(roots[name])
    args = lambda name: ["--job=collection", f"--data={data}", f"--out={roots[name]}",  # noqa
                         f"--steps={steps}"]
    _run(args("one"), 1, 4)
    _run(args("two"), 2, 2)
    one, two = _store(roots["one"]), _store(roots["two"])
    assert any(two[d][2] > 0 for d in worker.DOCS)
    _assert_stores_close(two, one, atol=1e-5)
    assert not any(n.startswith("pending") and os.listdir(os.path.join(roots["two"], n, "cartridges"))
                   for n in os.listdir(roots["two"]))

    # SIGKILL process 1 mid-run (after a few paced steps), then end its peer, as a failed node
    # ends a job; rerunning the same command resumes from the last checkpoint.
    procs = distributed.start_local(WORKER + args("killed") + ["--step_delay_s=0.3"], 2, 2)
    watchdog = threading.Timer(TIMEOUT_S, distributed.stop, [procs])  # ends a hung run
    watchdog.start()
    seen = []
    for line in procs[1].stdout:
        seen.append(line)
        if line.startswith("reported step 7"):
            break
    watchdog.cancel()
    os.killpg(procs[1].pid, signal.SIGKILL)
    time.sleep(1.0)
    distributed.stop(procs)
    codes, _ = distributed.wait_all(procs, 30)
    assert codes[1] == -signal.SIGKILL, "".join(seen)[-3000:]
    run_state = os.path.join(roots["killed"], "collection_run.json")
    assert os.path.exists(run_state)  # at least one checkpoint before the kill
    _run(args("killed"), 2, 2)
    _assert_stores_close(_store(roots["killed"]), two, atol=0)


def test_two_process_synthesis_writes_the_single_process_dataset(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _run(["--job=synthesis", f"--data={one}"], 1, 1)
    _run(["--job=synthesis", f"--data={two}"], 2, 1)
    assert [m["shard_count"] for m in dataset.read_manifests(two)] == [2, 2]
    a, b = dataset.ConversationSource(one), dataset.ConversationSource(two)
    key = lambda c: (c.doc_id, c.conversation_index)  # noqa: E731
    convs_a = sorted((a[i] for i in range(len(a))), key=key)
    convs_b = sorted((b[i] for i in range(len(b))), key=key)
    assert [key(c) for c in convs_a] == [key(c) for c in convs_b] and len(convs_a) == 8
    for x, y in zip(convs_a, convs_b):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_array_equal(x.loss_mask, y.loss_mask)
        np.testing.assert_array_equal(x.teacher_ids, y.teacher_ids)
        np.testing.assert_allclose(x.teacher_logprobs, y.teacher_logprobs, atol=1e-5)
        assert x.messages == y.messages


def test_a_failing_process_brings_the_run_down(tmp_path):
    t0 = time.monotonic()
    procs = distributed.start_local(WORKER + ["--job=train", "--fail_process=1"], 2, 1)
    codes, _ = distributed.wait_all(procs, TIMEOUT_S)
    # Process 0 waits at a barrier process 1 never reaches: JAX's runtime aborts it, or the
    # launcher stops it after its grace period; either way the run ends, failed.
    assert codes[1] == 3 and codes[0] != 0
    assert time.monotonic() - t0 < 60


def test_a_hung_run_is_ended_at_its_timeout_with_every_process_stack(tmp_path):
    procs = distributed.start_local(WORKER + ["--job=train", "--hang_process=1"], 2, 1)
    codes, outputs = distributed.wait_all(procs, 25)
    assert codes == [-signal.SIGKILL] * 2, outputs
    # Each process printed where it stood when the run was ended: process 1 in its sleep,
    # process 0 in the barrier that waits for it.
    assert "most recent call first" in outputs[1] and "in main" in outputs[1], outputs[1][-3000:]
    assert "in barrier" in outputs[0], outputs[0][-3000:]


def test_launcher_flags_are_checked():
    with pytest.raises(ValueError, match="process_id must be in"):
        distributed.initialize("127.0.0.1:1", 2, 5)
    with pytest.raises(ValueError, match="HOST:PORT"):
        distributed.initialize("localhost", 2, 0)
    assert distributed.local_rows(8, 1, 2) == slice(4, 8)
    with pytest.raises(ValueError, match="multiple of 3"):
        distributed.local_rows(8, 0, 3)
    assert {distributed.owner(d, 2) for d in "abcdefgh"} == {0, 1}
