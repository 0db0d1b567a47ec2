"""The CAS method table and claims from every eval/*.json of a study folder, e.g. a run
stopped before all its rows (rows it did not reach are left out; claims need their rows).

    python -m benchmarks.cas_claims_report benchmarks/results/compose_test

The last line is `composed_k3_minus_oracle=X composed_k7_minus_oracle=Y
retrieval_cas_minus_rag=Z token_ratio=R questions=N` (issue 24): the paired accuracy
differences of CAS composed with 3 and 7 others to its own oracle, of the best retrieval + CAS
row to the best RAG row, and RAG's attended positions per question over retrieval + CAS's
("nan" where a row is missing).
"""
import glob
import json
import os
import sys

from cas_jax.studies import cas_study, study


def read_results(run: str) -> dict[str, dict]:
    """eval/<name>.json of `run` by name; the isolated cartridge's oracle
    (oracle_cartridge_step<N>) is "oracle_cartridge", the naive composition's own oracle."""
    res = {}
    for path in sorted(glob.glob(os.path.join(run, "eval", "*.json"))):
        name = os.path.basename(path)[:-len(".json")]
        if name.startswith("oracle_cartridge_step"):
            name = "oracle_cartridge"
        with open(path) as f:
            res[name] = json.load(f)
    return res


def claims_line(res: dict[str, dict], k3: list[dict] | None = None,
                k7: list[dict] | None = None) -> str:
    """The last line (module doc), from `cas_study.claims` at k = 3 and 7 (computed here
    when not given)."""
    def find(rows, claim, key="diff"):
        r = next((r for r in rows if r["claim"] == claim), None)
        return "nan" if r is None else f"{r[key]:+.4f}" if key == "diff" else f"{r[key]:.2f}"

    k3 = cas_study.claims(res, k=3) if k3 is None else k3
    k7 = cas_study.claims(res, k=7) if k7 is None else k7
    n = len(res["cas_oracle"]["records"]) if "cas_oracle" in res else 0
    return (f"composed_k3_minus_oracle={find(k3, 'CAS composes')} "
            f"composed_k7_minus_oracle={find(k7, 'CAS composes')} "
            f"retrieval_cas_minus_rag={find(k3, 'retrieval vs RAG')} "
            f"token_ratio={find(k3, 'retrieval vs RAG', 'token_ratio')} questions={n}")


def report(res: dict[str, dict]) -> str:
    """The method table, the claims at k = 3 and 7, and the claims line."""
    missing = [n for n in ("closed_book", "icl") if n not in res]
    if missing:
        raise ValueError(f"no {missing} among the results (the table's references)")
    rows = [study.method_row(n, o, res["closed_book"], res["icl"], None, None,
                             recall=cas_study.recall(o)) for n, o in res.items()]
    k3, k7 = cas_study.claims(res, k=3), cas_study.claims(res, k=7)
    with_k = [r for r in k7 if r["claim"] in ("naive collapse", "CAS composes")]
    return (study.format_rows(rows) + "\n\n" + cas_study.format_claims(k3 + with_k)
            + "\n\n" + claims_line(res, k3, k7))


def main(run: str) -> None:
    try:
        print(report(read_results(run)))
    except ValueError as e:
        sys.exit(f"{run}/eval: {e}")


if __name__ == "__main__":
    main(sys.argv[1])
