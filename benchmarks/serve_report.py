"""The serve benchmark's cells, bars and last line (`benchmarks.serve`), and the same summary
read back from a run's log (`python -m benchmarks.serve --from_log=LOG`). No flags here, so
tests and other tools import it freely."""

from __future__ import annotations

import dataclasses

from cas_jax.serving import engine as serving_engine


@dataclasses.dataclass
class Cell:
    tokens_per_s: float
    ttft_p50: float
    ttft_p90: float
    itl_p50: float
    e2e_p50: float


def bars_line(name: str, values: dict) -> str:
    return f"bars {name}: " + ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def from_log(path: str) -> tuple[dict, dict, list[str], int]:
    """(results, bars, document sets, clients) from a run's log: its table rows and bars."""
    results, bars, sets = {}, {}, []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if line.startswith("bars ") and ":" in line:
                name, _, rest = line[5:].partition(": ")
                bars[name] = {k: v for k, _, v in (kv.partition("=") for kv in
                                                   rest.strip().split(", "))}
            elif len(parts) in (11, 12) and parts[0] in serving_engine.ENGINES:
                mode = " ".join(parts[2:len(parts) - 8])
                try:
                    c, tok, t50, t90, itl, e2e = (int(parts[-8]), *map(float, parts[-6:-1]))
                except ValueError:
                    continue
                results[parts[0], parts[1], mode, c] = Cell(tok, t50, t90, itl, e2e)
                sets += [parts[1]] if parts[1] not in sets else []
    if not results:
        raise SystemExit(f"error: --from_log={path} holds no table rows of benchmarks.serve")
    return results, bars, sets, max(c for *_, c in results)


def summary(results: dict, bars: dict, doc_sets: list[str], c: int) -> None:
    """Prints the bars, the cells the last line reads and the last line, at `c` clients:
    X = first engine's cart 1 / icl 1 tokens/s at the last document set, Y = that cart 1
    cell's TTFT p50, Z = first engine / static tokens/s in the first set's cart 1 cell."""
    engines = list(dict.fromkeys(e for e, *_ in results))
    first = engines[0]
    for name, values in bars.items():
        print(bars_line(name, values))
    cart, icl = results.get((first, doc_sets[-1], "cart 1", c)), results.get(
        (first, doc_sets[-1], "icl 1", c))
    x = cart.tokens_per_s / icl.tokens_per_s if cart and icl else float("nan")
    static = results.get(("static", doc_sets[0], "cart 1", c))
    mine = results.get((first, doc_sets[0], "cart 1", c))
    z = mine.tokens_per_s / static.tokens_per_s if static and mine and first != "static" \
        else float("nan")
    print(f"cells: X from {first} {doc_sets[-1]} cart 1 / icl 1 at {c} clients; Z from "
          f"{first} / static {doc_sets[0]} cart 1 at {c} clients (paper: 26.4x cartridge vs "
          f"ICL throughput)")
    ttft = cart.ttft_p50 if cart else float("nan")
    print(f"cartridge_vs_icl_throughput={x:.3f} ttft_p50_s={ttft:.3f} continuous_vs_static={z:.3f}")
