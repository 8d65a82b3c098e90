"""Where the test suite's CPU goes: pytest run under a sampler of every process's CPU time, grouped by
what the process is (a Ray actor's class and method from its process title, Ray's daemons, pytest, raytl
subprocesses), printed largest first with the number of processes of each kind.

    python bench/suite_cpu.py                               # the whole suite, as `pytest` runs it
    python bench/suite_cpu.py -n 0 tests/test_placement.py  # any pytest arguments
    python bench/suite_cpu.py --top 20 --json cpu.json -- -n 0 tests/test_finetune.py

Every 0.5 s it reads /proc/PID/stat (user + system time) of every process on the machine; a process that
lives less than that is missed, and the machine's other processes (kernel threads, the VM's agents) are
listed too, as they take the same cores (those already running count from the start on). A Ray worker
is named by its last process title other than `ray::IDLE` (Ray sets it to the actor class and the method
it runs). Linux only.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time

_TICK = os.sysconf("SC_CLK_TCK")
# Ray's and the suite's own processes, recognised in a command line (the first match names the process).
_KINDS = [
    "default_worker.py", "gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py", "runtime_env",
    "raytl.cli", "ray.scripts.scripts", "pytest", "import sys;exec(eval(sys.stdin.readline()))",
]  # fmt: skip


def kind(pid: int) -> str | None:
    """What process `pid` is, from its title (a Ray worker's `ray::Class.method`) or its command line."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        return None
    if argv and argv[0].startswith("ray::"):
        return argv[0].split(" ")[0][:60]
    line = " ".join(argv)
    for name in _KINDS:
        if name in line:
            return "pytest-xdist worker" if name.startswith("import sys") else name
    return f"{comm}: {line[:60]}" if line else comm


def cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


def sample(command: list[str], interval: float = 0.5) -> tuple[int, float, dict[int, list]]:
    """Run `command`, sampling every process until it exits: (exit status, wall seconds, pid -> [kind,
    cpu seconds])."""
    seen: dict[int, list] = {}
    me = os.getpid()
    # What the processes already running had spent: only what they spend from now on counts.
    before = {int(p): cpu_seconds(int(p)) or 0.0 for p in os.listdir("/proc") if p.isdigit()}
    start = time.monotonic()
    proc = subprocess.Popen(command)
    while True:
        done = proc.poll() is not None
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == me:
                continue
            pid = int(name)
            seconds = cpu_seconds(pid)
            if seconds is None:
                continue
            seconds -= before.get(pid, 0.0)
            if pid not in seen:
                seen[pid] = [kind(pid), seconds]
                continue
            seen[pid][1] = seconds
            current = seen[pid][0] or ""
            if current.startswith(("default_worker", "ray::IDLE")):  # a Ray worker gets its title late
                later = kind(pid)
                if later and later.startswith("ray::") and later != "ray::IDLE":
                    seen[pid][0] = later
        if done:
            return proc.returncode, time.monotonic() - start, seen
        time.sleep(interval)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=40, help="kinds of process to print (default 40)")
    parser.add_argument("--json", help="also write every kind's seconds and process count here")
    args, pytest_args = parser.parse_known_args()
    pytest_args = [a for a in pytest_args if a != "--"]
    status, wall, seen = sample([sys.executable, "-m", "pytest", *pytest_args])
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for name, seconds in seen.values():
        totals[name or "?"][0] += seconds
        totals[name or "?"][1] += 1
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])
    spent = sum(seconds for seconds, _ in totals.values())
    print(f"\npytest exited {status} after {wall:.0f} s; {spent:.0f} CPU-seconds on {os.cpu_count()} cores")
    for name, (seconds, count) in rows[: args.top]:
        print(f"{seconds:9.1f} s {count:5d} processes  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({name: {"seconds": s, "processes": n} for name, (s, n) in rows}, f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
