"""What the local Neo4j and Kafka servers share: jars fetched by Maven once, a pid file, a port, a clean stop."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def port_open(host: str, port: int) -> bool:
    """Whether something accepts connections on host:port."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def require(tool: str, hint: str, error: type[Exception]) -> str:
    """The path of `tool` on PATH, else `error` saying what to install."""
    path = shutil.which(tool)
    if not path:
        raise error(f"`{tool}` not found on PATH: {hint}")
    return path


def fetch_jars(pom: Path, lib: Path, properties: dict[str, str], what: str, error: type[Exception]) -> Path:
    """The runtime jars of `pom` copied into `lib` by Maven, once (a marker file says it finished)."""
    marker = lib / ".complete"
    if marker.exists():
        return lib
    mvn = require("mvn", f"install Maven (needed once to fetch {what} from Maven Central)", error)
    lib.mkdir(parents=True, exist_ok=True)
    cmd = [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies", f"-DoutputDirectory={lib}",
           "-DincludeScope=runtime", *(f"-D{k}={v}" for k, v in properties.items())]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise error(f"Maven could not fetch {what}:\n{result.stdout[-2000:]}")
    marker.touch()
    return lib


def running_pid(pidfile: Path) -> int | None:
    """The process id in `pidfile` while that process runs (an exited child of this process lingers as a
    zombie, which does not count)."""
    try:
        pid = int(pidfile.read_text())
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return None if state == "Z" else pid
    except (FileNotFoundError, ValueError, IndexError):
        return None


def stop(pidfile: Path, timeout: float) -> bool:
    """SIGTERM the process of `pidfile` (a clean shutdown), SIGKILL it past `timeout`; False if none ran."""
    pid = running_pid(pidfile)
    if not pid:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and running_pid(pidfile):
        time.sleep(0.2)
    if running_pid(pidfile):
        os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)
    return True
