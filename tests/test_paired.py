"""benchmarks.paired: b minus a per method on the same questions, refusing other questions."""

import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _eval(folder, method, correct, questions=None):
    os.makedirs(folder / "eval", exist_ok=True)
    questions = questions or [f"q{i}" for i in range(len(correct))]
    records = [{"doc_id": "d", "question": q, "kind": "mc", "correct_ll": c}
               for q, c in zip(questions, correct)]
    (folder / "eval" / f"{method}.json").write_text(json.dumps(
        {"summary": {"method": method}, "records": records}))


def _run(*args):
    return subprocess.run([sys.executable, "-m", "benchmarks.paired", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_rows_are_b_minus_a_on_shared_methods_and_named_pairs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _eval(a, "m", [1, 0, 0, 0])
    _eval(b, "m", [1, 1, 1, 0])
    _eval(a, "rag", [1, 1, 1, 1])
    _eval(b, "only_b", [0, 0, 0, 0])
    r = _run(f"--a={a}", f"--b={b}", "--pairs=rag:m")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| m |")
            or line.startswith("| rag |")]
    assert rows[0].startswith("| m | m | 4 | 0.250 | 0.750 | +0.500 [")
    assert rows[1].startswith("| rag | m | 4 | 1.000 | 0.750 | -0.250 [")
    assert r.stdout.strip().endswith("rows=2")


def test_other_questions_are_refused_naming_both_methods(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _eval(a, "m", [1, 0], ["q0", "q1"])
    _eval(b, "m", [1, 0], ["q1", "q0"])
    r = _run(f"--a={a}", f"--b={b}")
    assert r.returncode != 0 and "m vs m" in r.stderr and "same questions" in r.stderr
