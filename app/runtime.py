"""Process-level tuning shared by the API, the loaders and the worker."""
from __future__ import annotations

import gc


def freeze_heap() -> None:
    """Exempt every object alive now (the imported libraries) from garbage collection scans.

    Each full collection walks all tracked objects; with torch, dgl and pandas imported that is
    ~225,000 of them, and ingest or a refresh run allocates enough to trigger one every few hundred
    milliseconds. Measured: about half the Python CPU of the ingest path, and 0.4 of 1.1 s of a
    700-event refresh run. What is frozen lives as long as the process anyway.
    """
    gc.collect()
    gc.freeze()
