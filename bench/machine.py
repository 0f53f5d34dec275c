"""A description of the machine a benchmark ran on, recorded beside its results."""

from __future__ import annotations

import os
import platform


def describe() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }


def markdown(desc: dict) -> str:
    return (f"Machine: {desc['cpu']}, {desc['cores']} cores, {desc['memory_gib']} GiB RAM, "
            f"Python {desc['python']}, {desc['os']}")
