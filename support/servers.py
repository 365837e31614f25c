"""Processes the tests and the benchmarks start: free ports, readiness, `python -m app` subprocesses."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from app.config import ROOT


def free_port() -> int:
    """A free local TCP port for a server subprocess."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, tries: int = 120) -> None:
    """Poll `url`/readyz until the service answers 200 (up to a minute)."""
    for _ in range(tries):
        try:
            if requests.get(f"{url}/readyz", timeout=10).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)


def spawn(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`python -m app <args>` with its output in `log`."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "app", *args], env=env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM (a worker then releases its lease), SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(predicate, timeout: float = 60.0, step: float = 0.1):
    """Poll `predicate` until it returns something true (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not reached in time")
