"""Running this checkout's code in a child process, as a user's shell would."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_env() -> dict:
    """This environment with the checkout first on PYTHONPATH, so the child imports citrus_ext from here."""
    return {**os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def run_python(*argv, cwd=None, timeout=None) -> subprocess.CompletedProcess:
    """``python argv...`` in a child process, with its output captured as text."""
    return subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)
