"""What the code sandbox's isolation costs per program: the isolated sandbox against running without it.

Run from the repository (nothing is written into it)::

    python benchmarks/bench_sandbox.py                # 40 programs each way
    python benchmarks/bench_sandbox.py -n 100
    git show <commit>:plugins/evaluate/sandbox.py > /tmp/previous_sandbox.py
    python benchmarks/bench_sandbox.py --previous /tmp/previous_sandbox.py   # also that sandbox

What is compared
----------------
The same trivial HumanEval-style sample (``add_one``, a correct completion, three
assertions), run to a verdict one at a time, wall-clock from the call to its outcome:

* **isolated**: ``run_program(sample)``: the verdict process, the confined program's three
  processes (namespace holder, the PID namespace's init, the program), namespaces, the
  file view, seccomp; the program's interpreter starts inside it.
* **unisolated**: ``run_program(sample, isolated=False)``: the same two interpreters
  (verdict and program) and pipes, none of the kernel's isolation: the difference to
  ``isolated`` is what namespaces, the view and seccomp cost.
* **one interpreter**: ``python -I -c <prompt + completion + test + check(...)>``, the
  whole sample in one process, nothing else: the floor of any sandbox that starts a fresh
  interpreter per sample (what the earlier in-process guard amounted to, without its patching).
* **previous** (with ``--previous FILE``): a sandbox module with the earlier interface,
  ``run_program(source, limits)`` on the one-process program.

The ways take turns, the order rotating each repetition so drifting load hits all alike,
after one untimed run of each. Printed: median and mean milliseconds per program, each
way's median over the isolated one's, and samples per second with ``run_programs`` at 4
workers. Exit status 1 if any sample does not pass (the comparison would be meaningless).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

from machine_load import OtherLoad, describe

# standard library only: loaded by path
SANDBOX = Path(__file__).resolve().parents[1] / "llmexp" / "plugins" / "evaluate" / "sandbox" / "runner.py"

PROMPT = 'def add_one(x: int) -> int:\n    """Return x plus one."""\n'
COMPLETION = "    return x + 1\n"
TEST = "\n\ndef check(candidate):\n    assert candidate(1) == 2\n    assert candidate(-1) == 0\n    assert candidate(41) == 42\n"


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def ways(previous: Path = None) -> Dict[str, Callable[[], bool]]:
    sandbox = load(SANDBOX, "sandbox")
    sample = sandbox.Program(PROMPT + COMPLETION, PROMPT + TEST, "add_one")
    whole = f"{PROMPT}{COMPLETION}\n{TEST}\ncheck(add_one)\n"
    found = {
        "isolated": lambda: sandbox.run_program(sample).passed,
        "unisolated": lambda: sandbox.run_program(sample, isolated=False).passed,
        "one interpreter": lambda: subprocess.run([sys.executable, "-I", "-c", whole]).returncode == 0,
    }
    if previous is not None:
        earlier = load(previous, "previous_sandbox")
        found["previous"] = lambda: earlier.run_program(whole, earlier.Limits()).passed
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=40, help="programs per way")
    parser.add_argument("--previous", type=Path, help="an earlier sandbox.py (run_program(source, limits))")
    args = parser.parse_args()
    runs = ways(args.previous)
    names = list(runs)
    for name in names:  # untimed: caches warm, the isolation probed once
        if not runs[name]():
            print(f"{name}: the sample did not pass")
            return 1
    seconds: Dict[str, List[float]] = {name: [] for name in names}
    meter = OtherLoad().start()
    for repetition in range(args.n):
        for name in names[repetition % len(names) :] + names[: repetition % len(names)]:
            started = time.perf_counter()
            if not runs[name]():
                print(f"{name}: the sample did not pass")
                return 1
            seconds[name].append(time.perf_counter() - started)
    others = meter.cores()
    base = statistics.median(seconds["isolated"])
    print(f"{args.n} programs each, one at a time (ms per program):")
    print(f"{'way':<16} {'median':>8} {'mean':>8} {'median / isolated':>18}")
    for name in names:
        median, mean = statistics.median(seconds[name]), statistics.mean(seconds[name])
        print(f"{name:<16} {median * 1e3:8.1f} {mean * 1e3:8.1f} {median / base:18.2f}")
    sandbox = sys.modules["sandbox"]
    sample = sandbox.Program(PROMPT + COMPLETION, PROMPT + TEST, "add_one")
    for isolated in (True, False):
        started = time.perf_counter()
        outcomes = sandbox.run_programs([sample] * args.n, workers=4, isolated=isolated)
        rate = args.n / (time.perf_counter() - started)
        print(f"run_programs, 4 workers, {'isolated' if isolated else 'unisolated'}: {rate:.1f} samples/s "
              f"({sum(o.passed for o in outcomes)}/{args.n} passed)")  # fmt: skip
    print(f"other processes kept {describe(others)} cores busy during the timed runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
