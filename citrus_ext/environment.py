"""Machine, versions and date, written beside every result (benchmarks and evaluation cells)."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess

import torch


def environment(device: str) -> dict:
    """Where and with what a result was produced.

    Parameters
    ----------
    device : str
        The torch device the work ran on (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

    Returns
    -------
    dict
        ``date`` (UTC), ``device``, ``torch``, ``python``, ``machine``, ``cpu``, ``threads`` (torch's
        intra-op threads: CPU results can differ in the last bits with another count), ``commit``
        (``""`` outside a git checkout), ``transformers`` when installed, and ``gpu`` and ``cuda``
        on a CUDA device.
    """
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "commit": _commit(),
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


def _commit() -> str:
    """The checked-out commit, with "+dirty" when the tree has changes; "" outside a git clone.
    ``CITRUS_COMMIT`` names it where the tree travelled without its history (the lent GPU)."""
    if os.environ.get("CITRUS_COMMIT"):
        return os.environ["CITRUS_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+dirty" if dirty else "")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
