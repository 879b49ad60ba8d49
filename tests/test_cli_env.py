"""``mirstream worker`` sets ``streams.cli.WORKER_ENV`` before torch loads OpenMP, which reads it only then."""

from __future__ import annotations

import subprocess
import sys


def test_the_cli_module_loads_no_torch_before_the_worker_sets_its_environment() -> None:
    code = (
        "import sys, streams.cli, streams.security, streams.workerproc; "
        "print('torch' in sys.modules, sorted(streams.cli.WORKER_ENV))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False" and "OMP_WAIT_POLICY" in " ".join(out[1:])
