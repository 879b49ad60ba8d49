"""Runs a Faust worker as a child process: what the demo, ``mirstream smoke`` and the tests use.

A real process (not an in-test event loop) so a test can SIGKILL it mid-stream and start another.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from streams.settings import Settings

READY_MARK = "Ready"


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes ``Settings.from_env()`` in a child equal ``settings``."""
    env: dict[str, str] = {}
    for name, value in vars(settings).items():
        if isinstance(value, tuple):
            value = ",".join(value)
        env[f"MIRSTREAM_{name.upper()}"] = str(value)
    return env


class WorkerProcess:
    """``with WorkerProcess(settings, app="pipeline", log=path) as w: ...`` starts, waits for Ready, stops."""

    def __init__(
        self,
        settings: Settings,
        app: str = "pipeline",
        log: Path | str | None = None,
        extra_env: dict[str, str] | None = None,
        loglevel: str = "info",
    ) -> None:
        self.settings = settings
        self.app = app
        self.log = Path(log) if log else Path(settings.datadir) / f"worker-{app}-{os.getpid()}.log"
        self.extra_env = extra_env or {}
        self.loglevel = loglevel
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout: float = 90.0) -> WorkerProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        Path(self.settings.datadir).mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **settings_env(self.settings), **self.extra_env, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "streams.cli", "worker", "--app", self.app, "--loglevel", self.loglevel]
        self._log_start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.wait_ready(ready_timeout)
        return self

    def log_text(self) -> str:
        with open(self.log, "rb") as f:
            f.seek(self._log_start)
            return f.read().decode(errors="replace")

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}; log tail:\n{self.log_text()[-3000:]}")
            if READY_MARK in self.log_text():
                return
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout:.0f}s; log: {self.log}")

    def rss_bytes(self) -> int:
        """Resident memory of the worker now, its refiner process included (Linux ``/proc``); 0 when it is
        not running."""
        if self.proc is None or self.proc.poll() is not None:
            return 0
        return sum(_rss(pid) for pid in [self.proc.pid, *self.children()])

    def cpu_seconds(self) -> float:
        """CPU time (user + system, every thread) the worker and its refiner process used so far (Linux
        ``/proc``): a cost per event that other jobs on shared cores move less than a rate; nan when it
        is not running."""
        if self.proc is None or self.proc.poll() is not None:
            return float("nan")
        return sum(_cpu(pid) for pid in [self.proc.pid, *self.children()])

    def children(self) -> list[int]:
        """Pids of the worker's child processes (the refiner, multiprocessing's resource tracker)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        out = []
        with contextlib.suppress(OSError):  # the worker may exit meanwhile
            for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    out += [int(pid) for pid in (task / "children").read_text().split()]
        return out

    def refiner_pid(self) -> int | None:
        """The refiner process's pid, once it runs (``Settings.refine_process``)."""
        for pid in self.children():
            with contextlib.suppress(OSError):
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
        return None

    def kill(self) -> None:
        """SIGKILL: a crash, no clean shutdown, no final offset commit."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cpu(pid: int) -> float:
    """utime + stime of a process, seconds (0 once it is gone)."""
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def _rss(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
