"""`readmoe serve` as a child process on a free loopback port, for the benchmarks; stopped by its process id."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range (and above Ray's worker ports, 10002-19999): an
    ephemeral one can be taken by a Ray process's own connection between this check and the server's bind."""
    for port in random.sample(range(20000, 32768), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32767")


class Server:
    """`readmoe serve` as a child process on a free loopback port."""

    def __init__(self, model: Path, args: list[str], log: Path, cpus: set[int] | None = None):
        """`cpus`: pin the server (and all it starts) to these CPUs."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen([str(BIN / "readmoe"), "serve", "--model", str(model), "--port", str(self.port),
                                      "--served-model-name", str(model.resolve()), *args],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus))
        end = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > end:
                self.stop()
                raise RuntimeError("server did not come up in 120 s")
            time.sleep(0.5)

    def peak_rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(name))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
