"""Live progress bars for long jobs (tqdm): count, rate and ETA on a terminal.

Bars draw on stderr only when it is a terminal (`disable=None`), so logs written by nohup or CI
keep the jobs' own progress lines and no bar noise; `CAS_JAX_PROGRESS=0` turns them off too.
"""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def bar(total: int, desc: str, unit: str = "it", initial: int = 0) -> tqdm:
    """A bar over `total` units (use as a context manager; `update(n)` as work completes)."""
    off = os.environ.get("CAS_JAX_PROGRESS", "1") == "0"
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=False,
                dynamic_ncols=True, disable=True if off else None)
