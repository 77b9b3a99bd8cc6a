"""What every record carries: the device, the library versions and the package's commit."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from importlib import metadata

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git(*args) -> str:
    try:
        out = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def commit() -> str:
    """HEAD of the repository, with '+dirty' when the package's own sources differ from it."""
    head = _git("rev-parse", "--short=12", "HEAD")
    if not head:
        return "unknown"
    dirty = _git("status", "--porcelain", "--", "ms_fused", "csrc", "setup.py")
    return head + ("+dirty" if dirty else "")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 10**9


def load_average() -> float:
    """The 1-minute load average (runnable threads) of the machine; 0 where unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return 0.0


def describe(device: torch.device, threads=None) -> dict:
    threads = threads or torch.get_num_threads()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        device_text = f"cuda: {props.name}, {props.total_memory / 2**30:.0f} GiB"
        slug = re.sub(r"[^a-z0-9]+", "-", props.name.lower()).strip("-")
    else:
        device_text = f"cpu: {cpu_name()}, {threads} threads"
        slug = "cpu"
    versions = {"torch": torch.__version__, "triton": _version("triton"), "commit": commit()}
    environment = {
        **versions,
        "ms_fused": _version("ms_fused"),
        "pytorch_metric_learning": _version("pytorch-metric-learning"),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "threads": threads,
        "cores": os.cpu_count(),
        "load_before": load_average(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    return {"device": device_text, "device_slug": slug, "environment": environment,
            "per_record": {"device": device_text, **versions}}
