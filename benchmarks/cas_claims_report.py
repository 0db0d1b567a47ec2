"""The method table, the claims and one line of figures from any study folder's eval/*.json
(a quality study, a CAS or composition run, the whole-collection retrieval run), e.g. a run
stopped before all its rows (rows it did not reach are left out).

    python -m benchmarks.cas_claims_report benchmarks/results/compose_test

The last line gives, as `key=value`, every figure the folder supports (issues 24 and 25):
  oracle_minus_icl          paired accuracy difference of the single-cartridge oracle (the
                            isolated oracle_cartridge, else cas_oracle) to ICL;
  recovered_acc             that oracle's share of ICL's accuracy gain over closed book;
  compression               median document tokens / the oracle's cartridge tokens (the
                            documents' median from report.json when the study wrote it, else
                            from ICL's context tokens per document);
  questions                 questions of the closed-book row;
  composed_k3_minus_oracle, composed_k7_minus_oracle
                            CAS composed with 3 / 7 others to its own oracle (paired);
  retrieval_cas_minus_rag, token_ratio
                            best retrieval + CAS row to the best RAG row, and RAG's attended
                            positions per question over retrieval + CAS's;
  documents, collection_tokens
                            the retrieval pool, from a whole-collection run's report.json.
"""
import glob
import json
import os
import sys

import numpy as np

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


def _oracle(res: dict[str, dict]) -> str | None:
    return next((n for n in ("oracle_cartridge", "cas_oracle") if n in res), None)


def compression(res: dict[str, dict], oracle: str, median_doc_tokens: float | None
                ) -> float | None:
    """Median document tokens over the oracle's cartridge tokens per question; None where
    neither the study's median nor ICL's per-document context tokens are recorded."""
    cartridge_tokens = res[oracle]["summary"].get("cartridge_tokens")
    if median_doc_tokens is None:
        per_doc = {r["doc_id"]: r["context_tokens"] for r in res["icl"]["records"]
                   if "doc_id" in r and r.get("context_tokens")}
        median_doc_tokens = float(np.median(list(per_doc.values()))) if per_doc else None
    if not median_doc_tokens or not cartridge_tokens:
        return None
    return median_doc_tokens / cartridge_tokens


def figures(res: dict[str, dict], k3: list[dict] | None = None, k7: list[dict] | None = None,
            meta: dict | None = None) -> dict[str, str]:
    """The last line's figures (module doc) that `res` (and the run's report.json, `meta`)
    supports, formatted; `cas_study.claims` at k = 3 and 7 are computed here when not given."""
    meta = meta or {}
    out = {}
    oracle = _oracle(res)
    if oracle and "icl" in res:
        diff, _, _ = study.paired_diff_ci(study.mc_accuracy(res["icl"]),
                                          study.mc_accuracy(res[oracle]))
        out["oracle_minus_icl"] = f"{diff:+.4f}"
        if "closed_book" in res:
            acc = {n: float(study.mc_accuracy(res[n]).mean())
                   for n in (oracle, "closed_book", "icl")}
            gain = study.recovered(acc[oracle], acc["closed_book"], acc["icl"])
            out["recovered_acc"] = f"{gain:.4f}"
        ratio = compression(res, oracle, meta.get("median_document_tokens"))
        if ratio is not None:
            out["compression"] = f"{ratio:.2f}"
    if "closed_book" in res:
        out["questions"] = str(len(res["closed_book"]["records"]))
    k3 = cas_study.claims(res, k=3) if k3 is None else k3
    k7 = cas_study.claims(res, k=7) if k7 is None else k7
    for key, rows in (("composed_k3_minus_oracle", k3), ("composed_k7_minus_oracle", k7)):
        r = next((r for r in rows if r["claim"] == "CAS composes"), None)
        if r is not None:
            out[key] = f"{r['diff']:+.4f}"
    r = next((r for r in k3 if r["claim"] == "retrieval vs RAG"), None)
    if r is not None:
        out["retrieval_cas_minus_rag"] = f"{r['diff']:+.4f}"
        out["token_ratio"] = f"{r['token_ratio']:.2f}"
    for key in ("documents", "collection_tokens"):
        if key in meta:
            out[key] = str(meta[key])
    return out


def claims_line(res: dict[str, dict], k3: list[dict] | None = None,
                k7: list[dict] | None = None, meta: dict | None = None) -> str:
    """The last line (module doc)."""
    return " ".join(f"{k}={v}" for k, v in figures(res, k3, k7, meta).items())


def read_meta(run: str) -> dict:
    """The figures a study's report.json holds beside its rows (median_document_tokens;
    documents and collection_tokens of a whole-collection run); {} without one."""
    path = os.path.join(run, "report.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rep = json.load(f)
    return {k: rep[k] for k in ("median_document_tokens", "documents", "collection_tokens")
            if k in rep}


def report(res: dict[str, dict], meta: dict | None = None) -> str:
    """The method table, the claims at k = 3 and 7, and the figures line."""
    missing = [n for n in ("closed_book", "icl") if n not in res]
    if missing:
        raise ValueError(f"no {missing} among the results (the table's references)")
    rows = [study.method_row(n, o, res["closed_book"], res["icl"], None, None,
                             recall=cas_study.recall(o)) for n, o in res.items()]
    k3, k7 = cas_study.claims(res, k=3), cas_study.claims(res, k=7)
    with_k = [r for r in k7 if r["claim"] in ("naive collapse", "CAS composes")]
    return (study.format_rows(rows) + "\n\n" + cas_study.format_claims(k3 + with_k)
            + "\n\n" + claims_line(res, k3, k7, meta))


def main(run: str) -> None:
    try:
        print(report(read_results(run), read_meta(run)))
    except ValueError as e:
        sys.exit(f"{run}/eval: {e}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m benchmarks.cas_claims_report DIR (a folder with eval/*.json)")
    main(sys.argv[1])
