"""Issue 12's method table and claims from every eval/*.json of a study folder, e.g. a run
stopped before all its rows (rows it did not reach are left out; claims need their rows).

    python -m benchmarks.cas_claims_report runs/cas_best > runs/cas_best/claims_offline.md
"""
import glob
import json
import os
import sys

from cas_jax.studies import cas_study, study


def main(run: str) -> None:
    res = {}
    for path in sorted(glob.glob(os.path.join(run, "eval", "*.json"))):
        name = os.path.basename(path)[:-len(".json")]
        if name.startswith("oracle_cartridge_step"):
            name = "oracle_cartridge"  # the isolated cartridge: the naive composition's oracle
        with open(path) as f:
            res[name] = json.load(f)
    missing = [n for n in ("closed_book", "icl") if n not in res]
    if missing:
        sys.exit(f"{run}/eval: no {missing} (the table's references)")
    rows = [study.method_row(n, o, res["closed_book"], res["icl"], None, None,
                             recall=cas_study.recall(o)) for n, o in res.items()]
    print(study.format_rows(rows) + "\n\n" + cas_study.format_claims(cas_study.claims(res, k=3)))


if __name__ == "__main__":
    main(sys.argv[1])
