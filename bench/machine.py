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


def write_results(results_dir: str, name: str, result: dict, markdown_lines: list) -> None:
    """bench/results/<name>.json (everything) and <name>.md (the readable table)."""
    import json

    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, default=str)
    with open(os.path.join(results_dir, f"{name}.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(markdown_lines).rstrip("\n") + "\n")
