"""Runs a named set of experiment variants (`benchmarks.configs.SETS`), as the shell scripts
that held them did: resumable (rerun it), one variant after another, then the set's report.

  python -m benchmarks.variants --set=cas_dev                 # all, in the set's order
  python -m benchmarks.variants --set=cas_dev --only=all3,base3
  python -m benchmarks.variants --set=ablations --dry_run     # print the commands
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time

from absl import app, flags

from benchmarks.configs import CLAIMS, QUALITY, SETS, VariantSet

FLAGS = flags.FLAGS
flags.DEFINE_enum("set", None, sorted(SETS), "The variant set.")
flags.DEFINE_list("only", [], "Variants to run, in this order (default: all of the set).")
flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = ".venv/bin/python"


def commands(vs: VariantSet, names: list[str]) -> list[tuple[str, dict, list[str], str]]:
    """(name, extra environment, argv, log file or "") of every variant, then the report's."""
    out = []
    for name in names:
        folder = vs.out.format(name=name)
        if vs.runner == QUALITY:
            out.append((name, {}, [PY, "-m", "benchmarks.quality", *vs.common,
                                   f"--out={folder}", *vs.variants[name]], f"{folder}.log"))
        else:
            env = {"OUT": folder, "CAS_REC": vs.cas_rec.format(name=name)}
            if vs.rec:
                env["REC"] = vs.rec
            out.append((name, env, ["benchmarks/cas_claims.sh", *vs.common,
                                    *vs.variants[name]], ""))
    if vs.report:
        runs = ",".join(vs.out.format(name=n) for n in names)
        out.append(("report", {}, [PY, "-m", *(a.format(runs=runs) for a in vs.report)], ""))
    return out


def _now() -> str:
    return datetime.datetime.now().strftime("%a %b %d %H:%M:%S %Z %Y")


def main(argv):
    del argv
    vs = SETS[FLAGS.set]
    names = FLAGS.only or list(vs.variants)
    unknown = [n for n in names if n not in vs.variants]
    if unknown:
        raise app.UsageError(f"unknown variants {unknown}: expected {list(vs.variants)}")
    os.chdir(ROOT)
    if vs.wait_for and not FLAGS.dry_run:
        pgrep = ["pgrep", "-f", vs.wait_for]
        while subprocess.run(pgrep, stdout=subprocess.DEVNULL).returncode == 0:
            time.sleep(20)
    for name, env, cmd, log in commands(vs, names):
        if FLAGS.dry_run:
            print(" ".join([*(f"{k}={v}" for k, v in env.items()), *cmd])
                  + (f" > {log} 2>&1" if log else ""))
            continue
        if name == "report":
            os.execv(cmd[0], cmd)
        if vs.runner == QUALITY:
            if os.path.exists(os.path.join(vs.out.format(name=name), "report.json")):
                continue
            print(f"== {name} {_now()}", flush=True)
            with open(log, "w") as f:
                subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
            with open(log) as f:
                lines = f.read().splitlines()
            print(lines[-1] if lines else "", flush=True)
        elif subprocess.run(cmd, env={**os.environ, **env}).returncode != 0:
            sys.exit(1)
    if vs.runner == QUALITY and not FLAGS.dry_run:
        print(f"== all done {_now()}", flush=True)


if __name__ == "__main__":
    # Required when run, not on import: a test process that imports this module parses
    # other flags (tests/test_pipeline_config.py).
    flags.mark_flag_as_required("set")
    app.run(main)
