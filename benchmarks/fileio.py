"""File helpers shared by the I/O benchmarks."""

import os

from cas_jax.cartridges.store import CURRENT


def files_under(root: str) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]


def drop_page_cache(paths: list[str]) -> None:
    """Evicts the files from the OS page cache (fsync first: dirty pages cannot be dropped)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def live_data_files(store, ids: list[str] | None = None) -> list[str]:
    """The live `.bin` data file of each id of a CartridgeStore (`ids` None: every stored
    cartridge): what loading the cartridge and its optimizer state reads."""
    paths = []
    for doc_id in store.list() if ids is None else ids:
        directory = store.cartridge_dir(doc_id)
        with open(os.path.join(directory, CURRENT)) as f:
            paths.append(os.path.join(directory, f.read().strip() + ".bin"))
    return paths
