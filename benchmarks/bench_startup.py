"""Benchmark: what a command costs before it does any work, against importing Hydra itself.

Run by hand::

    python benchmarks/bench_startup.py [--repeat 7]

Times, in CPU seconds of the child process (user + system, from ``getrusage``: wall time on a
shared machine says more about the neighbours than about the command),

* the baseline, ``python -c "import hydra, omegaconf"``;
* ``python run.py seed=-1``: a config mistake, refused after composition (exit 1, one line);
* ``python run.py --help``: lpcvlab's help;
* ``python run.py --cfg job``: the composed config;
* ``lpcvlab --help`` (``python -m lpcvlab.cli --help``, what the console script runs).

Each command runs once to warm the bytecode cache, then ``--repeat`` times, the commands in turn
so that a change in the machine's load touches them all alike; the median is reported. The
commands run in a temporary folder (``run.py`` by its path), so nothing is written to the
checkout. Each run's exit code and output are checked (the one-line error, the help's groups,
the config's ``seed``): a command that got faster by failing differently does not count. The
last line gives each command's ratio to the baseline against the limit (``--limit``, 4x) and
whether every output was as expected; the exit code is 1 when a ratio is over the limit or an
output was not.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = str(REPO / "run.py")


@dataclass(frozen=True)
class Command:
    name: str
    argv: list[str]
    exit_code: int
    expect: str  # text the output (stdout + stderr) must contain


COMMANDS = [
    Command("import hydra, omegaconf", ["-c", "import hydra, omegaconf"], 0, ""),
    Command("run.py seed=-1", [RUN, "seed=-1"], 1, "error: seed=-1 must be >= 0"),
    Command("run.py --help", [RUN, "--help"], 0, "Groups you choose"),
    Command("run.py --cfg job", [RUN, "--cfg", "job"], 0, "seed: 0"),
    Command("lpcvlab --help", ["-m", "lpcvlab.cli", "--help"], 0, "reproduce"),
]


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(cmd: Command, cwd: str, env: dict[str, str]) -> tuple[float, bool]:
    """(CPU seconds of the child, whether it exited and printed as expected)."""
    before = child_cpu()
    proc = subprocess.run(
        [sys.executable, *cmd.argv], cwd=cwd, env=env, capture_output=True, text=True
    )
    spent = child_cpu() - before
    ok = proc.returncode == cmd.exit_code and cmd.expect in proc.stdout + proc.stderr
    if not ok:
        print(f"  {cmd.name}: exit {proc.returncode}, output:\n{proc.stdout}{proc.stderr}")
    return spent, ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--limit", type=float, default=4.0, help="largest ratio to the baseline")
    args = p.parse_args()
    env = dict(os.environ)
    src = str(REPO / "src")  # this checkout's package, whatever is installed
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    times: dict[str, list[float]] = {c.name: [] for c in COMMANDS}
    expected = True
    with tempfile.TemporaryDirectory(prefix="lpcvlab-bench-startup-") as cwd:
        for cmd in COMMANDS:  # warm-up: bytecode caches, the file system's cache
            expected &= run_once(cmd, cwd, env)[1]
        for _ in range(args.repeat):
            for cmd in COMMANDS:
                spent, ok = run_once(cmd, cwd, env)
                times[cmd.name].append(spent)
                expected &= ok
    base = statistics.median(times[COMMANDS[0].name])
    summary, within = [], True
    for cmd in COMMANDS:
        t = times[cmd.name]
        ratio = statistics.median(t) / base
        print(
            f"{cmd.name:<26} CPU median {statistics.median(t):.3f} s (min {min(t):.3f}, "
            f"max {max(t):.3f}, n={len(t)}) | {ratio:.1f}x the baseline"
        )
        if cmd is not COMMANDS[0]:
            within &= ratio <= args.limit
            summary.append(f"{cmd.name} {ratio:.1f}x")
    print(
        f"CPU against `import hydra, omegaconf` ({base:.3f} s): {'; '.join(summary)}; "
        f"{'all within' if within else 'NOT all within'} {args.limit:g}x; outputs "
        f"{'as expected' if expected else 'NOT as expected'}"
    )
    if not (within and expected):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
