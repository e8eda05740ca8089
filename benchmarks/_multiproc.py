"""Re-run a benchmark script on several CPU/GPU processes: ``accelerate launch --multi_gpu`` (gloo on CPU with
``use_cpu=True``), on a free port, with offline Hugging Face settings. Shared by the multi-process benchmarks.

Example::

    if "WORLD_SIZE" not in os.environ:          # the launcher: start the ranks
        sys.exit(relaunch(__file__, args.nproc, sys.argv[1:]))
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def relaunch(script: str, nproc: int, argv: list[str]) -> int:
    """Run ``script argv`` on ``nproc`` processes under ``accelerate launch``; return its exit code."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), os.path.abspath(script), *argv]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error")
    return subprocess.call(cmd, env=env)
