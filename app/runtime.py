"""Process-level tuning shared by the API, the loaders and the worker."""
from __future__ import annotations

import ctypes
import gc
import random

M_ARENA_MAX = -8  # glibc mallopt parameter


def freeze_heap() -> None:
    """Exempt every object alive now (the imported libraries) from garbage collection scans.

    Each full collection walks all tracked objects (with torch, dgl and pandas imported, hundreds of
    thousands), and ingest or a refresh run allocates enough to trigger one every few hundred
    milliseconds: a large share of their Python CPU (docs/benchmarks.md). Frozen objects are still
    freed when their last reference goes; only the cycle scans skip them.
    """
    gc.collect()
    gc.freeze()


def release_heap() -> None:
    """Hand the heap freed since back to the system (glibc keeps it for the process otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas (as MALLOC_ARENA_MAX does for a process started with it).

    glibc gives threads their own arenas, up to 8 per core; with thread pools (the scheduler's runs,
    request threads, the driver's) memory freed in one arena is not reused by the others, and RSS
    creeps over a long run. Not glibc (musl, macOS): nothing to do.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        pass


def spread_connections(wsgi, every: int):
    """`wsgi` asking the client to reconnect (`Connection: close`) after one answer in `every` on
    average, so that one client's requests spread over the server's worker processes.

    Granian keeps a connection with the process that accepted it, and a client that reuses its most
    recently idle connection (Go's, vegeta's) sends most of its requests down one or two of them: one
    worker can take most of the requests and queue while the other idles. A new connection goes to
    whichever process accepts it first. Random rather than counted: WSGI does not say which connection
    a request came on.
    """
    def app(environ, start_response):
        def start(status, headers, exc_info=None):
            if random.random() * every < 1:
                headers = [*headers, ("Connection", "close")]
            return start_response(status, headers, exc_info)
        return wsgi(environ, start)
    return app
