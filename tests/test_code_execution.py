"""The ``code`` task type: pass@k, the HumanEval layout, and the sandbox that runs completions.

The sandbox tests run real attack programs in real confined processes and check, from
outside, that nothing escaped; each docstring names the isolation it relies on
(``sandbox.py`` and ``isolation.py`` describe them).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from llmexp.errors import UserError
from llmexp.results.statistics import pass_at_k
from llmexp.plugins.evaluate.tasks.code import CODE, load_problems, machine_problems, program
from llmexp.plugins.evaluate.sandbox.runner import Limits, Program, isolation_problem, run_program, run_programs

from .conftest import REPO, read_results, run_llmexp

FIXTURE = Path(__file__).parent / "fixtures" / "humaneval_mini.jsonl"
QUICK = Limits(timeout_s=5.0)
ADD_ONE = load_problems(str(FIXTURE))[0]  # add_one(x): x + 1, checked with 1, -1 and 41
RIGHT = "    return x + 1\n"


def add_one(body: str = RIGHT, after: str = "") -> Program:
    """The add_one problem with ``body`` as the completion and ``after`` as top-level code following it."""
    return program(ADD_ONE, body + after)


# the attack programs' helper: run an action, say which error stopped it (or that it went through)
ATTEMPT = """
import errno
def attempt(action):
    try:
        action()
        return 'WENT THROUGH'
    except OSError as error:
        return errno.errorcode.get(error.errno) or str(getattr(error, 'reason', error))
"""


def processes_named(token: str) -> list:
    """Host pids whose command line holds ``token``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if token.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_pass_at_k_matches_hand_computed_values():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))  # 1 - 21/252
    assert pass_at_k(10, 3, 5) == pytest.approx(0.9166666666666666)
    assert pass_at_k(10, 3, 10) == 1.0
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(1, 1, 1) == 1.0
    for n, c, k in ((200, 13, 1), (200, 13, 10), (200, 13, 100), (50, 49, 2)):
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 6)


def test_this_machine_isolates():
    """The tests below need the kernel's isolation; on this project's machines (root in a VM) it is there."""
    assert isolation_problem() is None


def test_canonical_solutions_pass_and_wrong_ones_fail():
    """Isolated: the checks run in the verdict process against the confined program's answers."""
    problems = load_problems(str(FIXTURE))
    assert [p.entry_point for p in problems] == ["add_one", "is_palindrome", "sum_of_squares"]
    canonical = [json.loads(line)["canonical_solution"] for line in FIXTURE.read_text().splitlines()]
    wrong = ["    return x + 2\n", "    return True\n", "    return sum(numbers)\n"]
    samples = [program(p, c) for p, c in zip(problems, canonical)] + [program(p, w) for p, w in zip(problems, wrong)]
    outcomes = run_programs(samples, QUICK, workers=2)
    assert [o.status for o in outcomes] == ["passed"] * 3 + ["failed"] * 3
    assert outcomes[3].detail.startswith("checks.py:") and "assert candidate(1) == 2" in outcomes[3].detail
    assert "AssertionError" in outcomes[3].detail
    # what the function raises reaches the checks as the same built-in exception
    raising = Program("def f(x):\n    raise ValueError('no ' + x)\n",
                      "def check(candidate):\n    try:\n        candidate('way')\n    except ValueError as e:\n"
                      "        assert str(e) == 'no way'\n    else:\n        assert False\n", "f")  # fmt: skip
    assert run_program(raising, QUICK).status == "passed"


def test_answers_cross_to_the_checks_as_plain_data():
    """What the function returns reaches the checks as the plain type it is built on (and compares as one)."""
    checks = ("def check(candidate):\n    assert candidate('tuple') == (1, 2) and type(candidate('tuple')) is tuple\n"
              "    assert candidate('dict') == {'a': 2}\n    assert candidate('int') == 3 and candidate('float') == 0.5\n"
              "    assert candidate('nested') == [{1, 2}, frozenset([3]), b'x', 1j, None, True]\n")  # fmt: skip
    source = ("import collections, numpy\nPair = collections.namedtuple('Pair', 'a b')\n"
              "def f(kind):\n    return {'tuple': Pair(1, 2), 'dict': collections.Counter('aa'), 'int': numpy.int64(3),"
              " 'float': numpy.float32(0.5), 'nested': [{1, 2}, frozenset([3]), b'x', 1j, None, True]}[kind]\n")  # fmt: skip
    outcome = run_program(Program(source, checks, "f"), QUICK)
    assert outcome.status == "passed", outcome.detail


def test_a_flooded_reply_cannot_swamp_the_verdict_process():
    """The verdict process reads at most 64 MiB per answer (and has an address-space limit of its own), whatever
    the program writes on its reply descriptor."""
    flood = "import os, struct\nos.write(4, struct.pack('>I', 2**31))\nwhile True:\n    os.write(4, bytes(2**20))\n"
    outcome = run_program(add_one(after=flood), QUICK)
    assert outcome.status == "failed" and "over the limit of 67108864" in outcome.detail


def test_an_endless_loop_times_out_within_the_limit_and_the_next_sample_still_runs():
    """The verdict process's deadline; the PID namespace ends the loop with its init."""
    started = time.monotonic()
    outcomes = run_programs([add_one("    while True:\n        pass\n"), add_one()], Limits(timeout_s=1.0), workers=1)
    assert [o.status for o in outcomes] == ["timed_out", "passed"]
    assert 1.0 <= outcomes[0].seconds < 2.0
    assert time.monotonic() - started < 4.0


def test_floods_hogs_and_crashes_fail_only_their_own_sample():
    """Resource limits (file size caps output, address space caps memory); a crash is seen from outside."""
    cases = {
        "import ctypes\nctypes.string_at(0)\n": "crashed",  # a segfault
        "while True:\n    print('x' * 10000)\n": "failed",  # output capped by the file-size limit
        "x = bytearray(8 * 2**30)\n": "failed",  # MemoryError under the address-space limit
        "raise SystemExit(3)\n": "failed",
        "import sys\nsys.stdout.close()\n": "passed",  # its output is its own business
    }
    outcomes = run_programs([add_one(after=code) for code in cases], QUICK, workers=2)
    assert [o.status for o in outcomes] == list(cases.values())
    assert "SIGSEGV" in outcomes[0].detail
    assert "File too large" in outcomes[1].detail
    assert "MemoryError" in outcomes[2].detail
    assert "status 3" in outcomes[3].detail


def test_an_exit_before_the_checks_does_not_count_as_a_pass():
    """The verdict is check() returning in the verdict process; the program's exit status cannot make it."""
    for early_exit in ("    import os\n    os._exit(0)\n", "    import sys\n    sys.exit(0)\n"):
        # the function body exits when check() first calls it: before any assertion runs
        outcome = run_program(add_one(early_exit), QUICK)
        assert outcome.status == "exited_early" and not outcome.passed
    assert run_program(add_one(after="import os\nos._exit(0)\n"), QUICK).status == "exited_early"


def test_a_sample_cannot_see_the_parents_secrets(monkeypatch):
    """The program's environment is built from nothing (PATH, HOME, TMPDIR, LANG, thread counts)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-for-children")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    check = "import os\nassert 'OPENAI_API_KEY' not in os.environ and 'HTTPS_PROXY' not in os.environ\n"
    assert run_program(add_one(after=check), QUICK).status == "passed"


def test_the_program_runs_unprivileged_in_a_view_of_its_own():
    """User namespace and uid (nobody when the caller is root), no capabilities, no_new_privs, seccomp (mode 2),
    only descriptors 0-4, its own PID namespace (pid 2 under the reaper), a read-only view without the
    repository's data, a writable /tmp and nothing else (but the folders an interpreter under /tmp is bound into)."""
    from llmexp.plugins.evaluate.sandbox.isolation import readable_paths

    listed = sorted({"program.py"} | {Path(path).parts[2] for path in readable_paths() if path.startswith("/tmp/")})
    probe = f"""
import os
status = dict(line.split(':\\t', 1) for line in open('/proc/self/status').read().splitlines() if ':\\t' in line)
assert status['CapEff'].strip() == '0' * 16, status['CapEff']
assert status['NoNewPrivs'].strip() == '1' and status['Seccomp'].strip() == '2'
assert os.getuid() != 0 and os.getpid() == 2, (os.getuid(), os.getpid())
fds = sorted(int(fd) for fd in os.listdir('/proc/self/fd'))
assert fds == [0, 1, 2, 3, 4, 5], fds  # 5: the listing itself
assert not os.path.exists({str(FIXTURE)!r}) and not os.path.exists({str(REPO / 'tests')!r})
assert os.getcwd() == '/tmp' and sorted(os.listdir('/tmp')) == {listed!r}, os.listdir('/tmp')
open('/tmp/notes.txt', 'w').write('x')
assert open('notes.txt').read() == 'x'
"""
    outcome = run_program(add_one(after=probe), QUICK)
    assert outcome.status == "passed", outcome.detail
    if os.geteuid() == 0:
        assert run_program(add_one(after="import os\nassert os.getuid() == 65534\n"), QUICK).passed


@pytest.fixture
def outside_files(tmp_path):
    """Two host files anyone may write: one outside the program's view (under tmp_path), one inside it (in
    ``sys.prefix``, which the view shows read-only). Each test checks they still say ``untouched``."""
    hidden, visible = tmp_path / "outside.txt", Path(sys.prefix) / f".sandbox-target-{uuid.uuid4().hex}"
    tmp_path.chmod(0o777)
    for path in (hidden, visible):
        path.write_text("untouched")
        path.chmod(0o666)
    yield hidden, visible
    visible.unlink()


def test_an_interpreter_under_tmp_is_in_the_view_and_tmp_stays_writable(tmp_path):
    """Mount namespace: a virtual environment under /tmp is bound read-only inside the program's own /tmp."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(tmp_path / "venv")],
                   check=True)  # fmt: skip
    script = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("sandbox", {str(REPO / "llmexp" / "plugins" / "evaluate" / "sandbox" / "runner.py")!r})
sandbox = importlib.util.module_from_spec(spec)
sys.modules["sandbox"] = sandbox
spec.loader.exec_module(sandbox)
source = "import os, sys\\ndef f():\\n    open('/tmp/x', 'w').write('x')\\n    return [sys.prefix, os.listdir('/tmp')]\\n"
checks = "def check(candidate):\\n    prefix, listed = candidate()\\n    assert prefix.startswith('/tmp/') and 'x' in listed\\n"
outcome = sandbox.run_program(sandbox.Program(source, checks, "f"))
print(outcome.status, outcome.detail)
"""
    result = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-I", "-c", script], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.stdout.strip() == "passed", result.stdout + result.stderr


def test_fileio_and_open_cannot_write_outside_the_programs_tmpfs(outside_files):
    """Mount namespace: the host's files are either absent from the view (ENOENT) or read-only (EROFS),
    whichever Python route opens them (``_io.FileIO`` got past the old sandbox's patched ``open``)."""
    hidden, visible = outside_files
    attack = ATTEMPT + f"""
import _io, os
seen = []
for target in ({str(hidden)!r}, {str(visible)!r}, '/etc/llmexp-escape', '/usr/llmexp-escape'):
    seen += [attempt(lambda: _io.FileIO(target, 'w').write(b'escaped')),
             attempt(lambda: open(target, 'a').write('escaped')),
             attempt(lambda: os.write(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND), b'escaped'))]
raise RuntimeError(' '.join(seen))
"""
    outcome = run_program(add_one(after=attack), QUICK)
    assert hidden.read_text() == "untouched" and visible.read_text() == "untouched"
    assert not Path("/etc/llmexp-escape").exists() and not Path("/usr/llmexp-escape").exists()
    assert outcome.status == "failed"
    assert "RuntimeError: " + " ".join(["ENOENT"] * 3 + ["EROFS"] * 9) in outcome.detail


def test_a_hard_link_cannot_carry_writes_outside(outside_files):
    """Mount namespace: a link into the tmpfs from a read-only bind is another mount (EXDEV); the host file
    is untouched. (The old sandbox let ``os.link`` + append write an outside file.)"""
    hidden, visible = outside_files
    attack = ATTEMPT + f"""
import os
def link_and_append(target):
    os.link(target, '/tmp/inside')
    open('/tmp/inside', 'a').write('escaped')
raise RuntimeError(' '.join(attempt(lambda: link_and_append(target)) for target in ({str(visible)!r}, {str(hidden)!r})))
"""
    outcome = run_program(add_one(after=attack), QUICK)
    assert visible.read_text() == "untouched" and hidden.read_text() == "untouched"
    assert outcome.status == "failed" and "RuntimeError: EXDEV ENOENT" in outcome.detail


def test_no_socket_reaches_the_host_not_even_the_original_class():
    """Seccomp refuses socket(2) whatever the route (the original ``_socket.socket`` found through the MRO,
    ``ctypes``); the network namespace behind it has no interface but a loopback that is down."""
    attack = ATTEMPT + """
import ctypes, socket, urllib.request
original = [c for c in socket.socket.__mro__ if c.__module__ == '_socket'][0]
seen = [attempt(lambda: original(socket.AF_INET, socket.SOCK_STREAM).connect(('127.0.0.1', PORT))),
        attempt(lambda: socket.create_connection(('127.0.0.1', PORT), timeout=2)),
        attempt(lambda: urllib.request.urlopen('http://127.0.0.1:PORT/', timeout=2)),
        attempt(lambda: original(socket.AF_UNIX, socket.SOCK_STREAM))]
libc = ctypes.CDLL(None, use_errno=True)
seen.append('fd' if libc.socket(2, 1, 0) >= 0 else errno.errorcode[ctypes.get_errno()])
interfaces = [line.split(':')[0].strip() for line in open('/proc/net/dev').read().splitlines()[2:]]
raise RuntimeError(' '.join(seen) + ' interfaces=' + ','.join(interfaces))
"""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        outcome = run_program(add_one(after=attack.replace("PORT", str(server.getsockname()[1]))), QUICK)
        with pytest.raises(socket.timeout):
            server.accept()  # nobody got through
    assert outcome.status == "failed"
    assert "RuntimeError: EPERM EPERM [Errno 1] Operation not permitted EPERM EPERM interfaces=lo" in outcome.detail


def test_signals_cannot_reach_any_process_outside():
    """PID namespace: no process outside has a pid inside, so ``os.kill``, ``ctypes`` ``kill`` and
    ``pidfd_open`` + ``pidfd_send_signal`` on a host pid find nothing (ESRCH), ``kill(-1)`` reaches only the
    sample, and its init ignores the program's SIGKILL; as root, also the uid (nobody cannot signal root)."""
    bystander = subprocess.Popen(["sleep", "60"])
    attack = f"""
import ctypes, errno, os, signal
libc = ctypes.CDLL(None, use_errno=True)
PIDFD_OPEN, PIDFD_SEND_SIGNAL = 434, 424
seen = []
def errno_of(result):
    return errno.errorcode[ctypes.get_errno()] if result < 0 else 'OK'
for pid in ({bystander.pid}, os.getppid()):
    seen.append(errno_of(libc.kill(pid, signal.SIGKILL)))
    pidfd = libc.syscall(PIDFD_OPEN, pid, 0)
    seen.append(errno_of(pidfd) if pidfd < 0 else errno_of(libc.syscall(PIDFD_SEND_SIGNAL, pidfd, signal.SIGKILL, 0, 0)))
try:
    os.kill({bystander.pid}, signal.SIGKILL)
except OSError as error:
    seen.append(errno.errorcode[error.errno])
seen.append(errno_of(libc.kill(-1, signal.SIGKILL)))
raise RuntimeError(' '.join(seen))
"""
    try:
        outcome = run_program(add_one(after=attack), QUICK)
        time.sleep(0.2)
        assert bystander.poll() is None  # still running
    finally:
        bystander.kill()
        bystander.wait()
    # the host pid does not exist inside; the parent is the namespace's init, which a signal from inside does
    # not kill (as root's program, nobody may not even send it one); kill(-1) finds no one else (ESRCH)
    parent = "EPERM EPERM" if os.geteuid() == 0 else "OK OK"
    assert outcome.status == "failed" and f"RuntimeError: ESRCH ESRCH {parent} ESRCH ESRCH" in outcome.detail


def test_forks_are_bounded_and_none_outlives_the_sample():
    """``RLIMIT_NPROC`` counted in the program's own user namespace (uid nobody when the caller is root)
    stops a ``ctypes`` fork loop; the PID namespace's init takes every child with it when the sample ends."""
    token = f"llmexp-fork-{uuid.uuid4().hex}"
    attack = f"""
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
forked = 0
while forked < 500:
    pid = libc.fork()
    if pid == 0:
        os.execv('/bin/sleep', [{token!r}, '60'])
    if pid < 0:
        break
    forked += 1
raise RuntimeError(f'forked {{forked}} then ' + errno.errorcode[ctypes.get_errno()])
"""
    outcome = run_program(add_one(after=attack), QUICK)
    assert outcome.status == "failed"
    forked = int(outcome.detail.split("RuntimeError: forked ")[1].split()[0])
    assert 0 < forked < QUICK.processes and "then EAGAIN" in outcome.detail
    assert processes_named(token) == []


@pytest.mark.parametrize("ending", ["passes", "hangs"])
def test_a_child_that_calls_setsid_dies_with_the_sample(ending):
    """PID namespace: a child that leaves the session (``setsid``) and double-forks is killed when the
    namespace's init ends: after the checks, or at the time limit."""
    token = f"llmexp-setsid-{uuid.uuid4().hex}"
    escape = f"""
import os
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv('/bin/sleep', [{token!r}, '60'])
    os._exit(0)
os.wait()
"""
    body = RIGHT if ending == "passes" else "    import time\n    time.sleep(60)\n"
    outcome = run_program(add_one(body, after=escape), Limits(timeout_s=2.0))
    assert outcome.status == {"passes": "passed", "hangs": "timed_out"}[ending], outcome.detail
    assert processes_named(token) == []


@pytest.mark.parametrize(
    "attack, status",
    [
        # the old sandbox's marker sat in its caller's frame: read whatever the frames and the heap hold, print it
        # everywhere, exit 0 before the checks run
        ("import gc, os, sys\nfound = [repr(v) for f in [sys._getframe()] for v in f.f_back.f_locals.values()]"
         " if sys._getframe().f_back else []\nfound += [o for o in gc.get_objects() if isinstance(o, str)"
         " and 'done' in o][:50]\nfor fd in (1, 2, *range(5, 64)):\n    try:\n        os.write(fd, ('\\n'.join(found)"
         " + '\\n').encode())\n    except OSError:\n        pass\nos._exit(0)\n", "exited_early"),
        # a forged verdict on every descriptor but the calls' own two
        ("import os\nfor fd in (0, 1, 2, *range(5, 64)):\n    try:\n        os.write(fd, b'{\"status\": \"passed\", \"detail\": \"\"}')"
         "\n    except OSError:\n        pass\nos._exit(0)\n", "exited_early"),
        # an answer that equals everything
        ("class Always:\n    def __eq__(self, other):\n        return True\nadd_one = lambda x: Always()\n", "failed"),
        # the same trick inside a plain type: it crosses as a plain int and compares as one
        ("class Sly(int):\n    def __eq__(self, other):\n        return True\nadd_one = lambda x: Sly(0)\n", "failed"),
        # patching its own interpreter: the checks are not in it
        ("import builtins, atexit, os, sys\nbuiltins.AssertionError = type('Nothing', (Exception,), {})\n"
         "sys.excepthook = lambda *a: None\natexit.register(lambda: os._exit(0))\nadd_one = lambda x: x\n", "failed"),
    ],
    ids=["marker-from-frames", "forged-verdict-on-every-fd", "always-equal", "always-equal-int", "patched-interpreter"],
)
def test_a_pass_cannot_be_forged_from_inside_the_program(attack, status):
    """The verdict is taken in the verdict process (another PID namespace, not dumpable, its report on a
    descriptor the program never holds); answers come back as plain data only."""
    outcome = run_program(add_one(after=attack), QUICK)
    assert outcome.status == status, outcome.detail


def test_the_program_cannot_read_the_tests_or_the_data_set():
    """Mount namespace: the checks never enter the program's process, and the data set is not in its view."""
    spy = f"""
import gc
assert not [o for o in gc.get_objects() if isinstance(o, str) and 'candidate(41)' in o]
try:
    open({str(FIXTURE)!r})
except FileNotFoundError:
    pass
else:
    raise AssertionError('the data set is readable')
"""
    outcome = run_program(add_one(after=spy), QUICK)
    assert outcome.status == "passed", outcome.detail


SECCOMP_LIKE_DOCKER = """
import sys
from llmexp.plugins.evaluate.sandbox.kernel import restrict_syscalls
restrict_syscalls(("unshare",))  # as Docker's default seccomp profile: no unshare, no namespace-making clone
"""


def test_without_namespaces_the_sandbox_refuses_unless_the_user_opts_in(tmp_path):
    """Where user namespaces are closed (here: a seccomp filter like Docker's default profile, which the
    processes below inherit), isolation_problem says why, the code task refuses to run at the machine check
    and at its start (UserError naming unsafe_allow_unisolated), and with the opt-in the programs run unisolated."""
    script = SECCOMP_LIKE_DOCKER + f"""
import json
from llmexp.errors import UserError
from llmexp.plugins.evaluate.tasks import code as code_execution
from llmexp.plugins.evaluate.sandbox.runner import isolation_problem, run_program
from llmexp.sdk import TaskInputs
spec = {{"type": "code", "path": {str(FIXTURE)!r}}}
refusals = code_execution.machine_problems([spec], "technique.tasks")
waived = code_execution.machine_problems([dict(spec, unsafe_allow_unisolated=True)], "technique.tasks")
try:
    code_execution.run(spec, TaskInputs(world=None), scorer=None)
    at_start = None
except UserError as error:
    at_start = str(error)
sample = code_execution.program(code_execution.load_problems(spec["path"])[0], "    return x + 1\\n")
print(json.dumps({{"problem": isolation_problem(), "refusals": refusals, "waived": waived, "at_start": at_start,
                  "unisolated": run_program(sample, isolated=False).status}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert "unshare" in seen["problem"] and "Operation not permitted" in seen["problem"]
    (refusal,) = seen["refusals"]
    assert refusal.startswith("technique.tasks[0]: the code task runs the model's programs isolated")
    assert "technique.tasks[0].unsafe_allow_unisolated=true" in refusal and seen["problem"] in refusal
    assert seen["waived"] == [] and "unsafe_allow_unisolated" in seen["at_start"]
    assert seen["unisolated"] == "passed"


def test_the_llmexp_command_refuses_before_any_stage_and_runs_when_waived(tmp_path, tiny_checkpoint):
    """The same closed namespaces for the real command (a sitecustomize installs the filter): exit 2 with the
    paragraph before the model loads; with unsafe_allow_unisolated=true the evaluation runs, with a warning."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SECCOMP_LIKE_DOCKER)
    env = {"PYTHONPATH": str(tmp_path / "site")}
    task = f"type: code, path: {FIXTURE}, max_new_tokens: 4"
    refused = run_llmexp("technique=evaluate", f"model.path={tiny_checkpoint}", f"technique.tasks=[{{{task}}}]",
                         cwd=tmp_path, env=env)  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    message = " ".join(refused.stderr.split())
    assert "technique.tasks[0]: the code task runs the model's programs isolated" in message
    assert "technique.tasks[0].unsafe_allow_unisolated=true" in message and "Traceback" not in refused.stderr
    waived = run_llmexp("technique=evaluate", f"model.path={tiny_checkpoint}",
                        f"technique.tasks=[{{{task}, unsafe_allow_unisolated: true}}]", cwd=tmp_path, env=env)  # fmt: skip
    assert waived.returncode == 0, waived.stderr
    assert "WITHOUT isolation" in waived.stderr
    (results,) = (tmp_path / "outputs").rglob("results.json")
    assert "code_pass_at_1" in json.dumps(read_results(results.parent))


NON_ROOT = """
import importlib.util, json, sys, uuid
spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])
sandbox = importlib.util.module_from_spec(spec)
sys.modules["sandbox"] = sandbox
spec.loader.exec_module(sandbox)
checks = "def check(candidate):\\n    assert candidate(1) == 2\\n"
def sample(body, after=""):
    return sandbox.Program("def add_one(x):\\n" + body + after, checks, "add_one")
sleeper = f"os.execv('/bin/sleep', [{sys.argv[2]!r}, '60'])"
escape = f"import os\\nif os.fork() == 0:\\n    os.setsid()\\n    {sleeper}\\n"
forks = f"import ctypes, os\\nlibc = ctypes.CDLL(None)\\nn = 0\\nwhile n < 500:\\n    pid = libc.fork()\\n" \\
        f"    if pid == 0:\\n        {sleeper}\\n    if pid < 0:\\n        break\\n    n += 1\\n" \\
        "raise RuntimeError(f'forked {n}')\\n"
write = "open('/etc/escape', 'w')\\n"
outcomes = [sandbox.run_program(s, sandbox.Limits(timeout_s=5)) for s in
            (sample("    return x + 1\\n"), sample("    return x\\n"), sample("    return x + 1\\n", escape),
             sample("    return x + 1\\n", forks), sample("    return x + 1\\n", write))]
print(json.dumps({"problem": sandbox.isolation_problem(), "outcomes": [[o.status, o.detail] for o in outcomes]}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid to try the unprivileged path needs root")
def test_an_unprivileged_caller_isolates_through_its_own_user_namespace():
    """A non-root caller (uid 65534 here) gets the same isolation from an unprivileged user namespace: the
    namespaces, the read-only view, RLIMIT_NPROC in that namespace, the PID namespace's kill. Runs the
    sandbox modules by path under the system interpreter, which uid 65534 can read (root's venv it may not)."""
    interpreter = shutil.which("python3", path="/usr/bin:/bin")
    setpriv = shutil.which("setpriv")
    sandbox_file = REPO / "llmexp" / "plugins" / "evaluate" / "sandbox" / "runner.py"
    readable = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "test", "-r",
                               str(sandbox_file)]).returncode == 0 if setpriv else False  # fmt: skip
    if not (interpreter and setpriv and readable):
        pytest.skip("needs setpriv, a system python3 and a repository that uid 65534 can read")
    token = f"llmexp-unprivileged-{uuid.uuid4().hex}"
    result = subprocess.run(
        [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", interpreter, "-I", "-c", NON_ROOT,
         str(sandbox_file), token],
        capture_output=True, text=True, timeout=180, cwd="/", env={"PATH": os.defpath, "TMPDIR": "/tmp"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["problem"] is None
    statuses = [status for status, _ in seen["outcomes"]]
    assert statuses == ["passed", "failed", "passed", "failed", "failed"], seen["outcomes"]
    forked = int(seen["outcomes"][3][1].split("RuntimeError: forked ")[1].split()[0])
    assert forked < Limits().processes
    assert "Read-only file system" in seen["outcomes"][4][1]
    assert processes_named(token) == []


def test_problems_name_the_file_line_and_bad_settings(tmp_path):
    check = CODE.problems
    assert check({"type": "code", "path": str(FIXTURE), "n_samples": 10, "k": [1, 10]}, "technique.tasks[0]") == []
    found = check({"type": "code", "path": str(FIXTURE), "n_samples": 2, "k": [1, 5], "top_p": 0}, "technique.tasks[0]")
    assert len(found) == 2
    assert "technique.tasks[0].k=[1, 5]" in found[0] and "n_samples" in found[0]
    assert "technique.tasks[0].top_p=0" in found[1]
    (found,) = check({"type": "code", "path": str(FIXTURE), "unsafe_allow_unisolated": "yes"}, "t")
    assert found == "t.unsafe_allow_unisolated='yes' must be true or false."
    broken = tmp_path / "broken.jsonl"
    broken.write_text(FIXTURE.read_text().splitlines()[0] + "\n" + '{"task_id": "x", "prompt": "def f():\\n"}\n')
    (message,) = check({"type": "code", "path": str(broken)}, "t")
    assert f"{broken}:2" in message and "test, entry_point" in message
    (message,) = check({"type": "code", "path": str(tmp_path / "absent.jsonl")}, "t")
    assert "does not exist" in message
    with pytest.raises(UserError, match=r"broken.jsonl:2"):
        load_problems(str(broken))
    # the checks run apart from the completion, so the prompt must be complete on its own
    headless = tmp_path / "headless.jsonl"
    row = {"task_id": "h", "prompt": "def f(x):\n", "test": "def check(candidate):\n    pass\n", "entry_point": "f"}
    headless.write_text(json.dumps(row) + "\n")
    (message,) = check({"type": "code", "path": str(headless)}, "t")
    assert f"{headless}:1: the prompt followed by the test is not valid Python" in message


def test_machine_problems_are_empty_where_the_kernel_isolates():
    entries = [{"type": "code", "path": str(FIXTURE)}, "multiple_choice", {"type": "mmlu", "path": "x"}]
    assert machine_problems(entries, "technique.tasks") == []


def problems_the_words_cannot_change(tmp_path: Path) -> str:
    """Two problems whose prompts hold a whole function and end inside a comment that the completion continues.

    Random weights write random words (never a newline: the embedded tokenizer has none),
    and in a comment they cannot matter: the first function is right, the second wrong, so
    every sample of the first passes and none of the second, whatever the model writes.
    """
    path = tmp_path / "problems.jsonl"
    test = "\n\ndef check(candidate):\n    assert candidate(2) == 4\n"
    rows = [
        {"task_id": "right", "prompt": "def double(x):\n    return 2 * x\n# ", "test": test, "entry_point": "double"},
        {"task_id": "wrong", "prompt": "def double(x):\n    return x + 3\n# ", "test": test, "entry_point": "double"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def tiny_scorer(tiny_checkpoint):
    from llmexp.models.loading import load_model
    from llmexp.plugins.evaluate.harness.scoring import Scorer

    model, tokenizer = load_model(tiny_checkpoint)[:2]
    return Scorer(model, tokenizer, max_new_tokens=40)


def test_the_code_task_runs_the_models_completions_through_the_registry(tiny_scorer, tmp_path):
    from llmexp.data.embedded import build_world
    from llmexp.plugins.evaluate.harness.registry import resolve_tasks, run_task
    from llmexp.sdk import TaskInputs

    path = problems_the_words_cannot_change(tmp_path)
    entry = {"type": "code", "name": "mini_code", "path": path, "max_new_tokens": 8}
    (task,), problems = resolve_tasks([entry], None, "technique.tasks")
    assert problems == [] and task.headline == "mini_code_pass_at_1"
    stage_dir = tmp_path / "stage"
    stage_dir.mkdir()
    result = run_task(task, TaskInputs(world=build_world(0), stage_dir=str(stage_dir)), tiny_scorer)
    assert result.metrics == {"mini_code_pass_at_1": 0.5, "mini_code_samples_timed_out": 0.0}
    assert [row["correct"] for row in result.rows] == [True, False]
    assert [row["outcomes"][0]["status"] for row in result.rows] == ["passed", "failed"]
    assert all(isinstance(row["completions"][0], str) and "\n" not in row["completions"][0] for row in result.rows)
    assert list(stage_dir.iterdir()) == []  # the programs write nowhere on the host


def test_sampled_completions_are_seeded_and_scored_per_problem(tiny_scorer, tmp_path):
    from llmexp.data.embedded import build_world
    from llmexp.sdk import TaskInputs

    spec = {"type": "code", "path": problems_the_words_cannot_change(tmp_path), "n_samples": 4, "k": [1, 2, 4],
            "temperature": 1.0, "seed": 3, "max_new_tokens": 8}
    assert CODE.problems(spec, "t") == []
    inputs = TaskInputs(world=build_world(0))
    result = CODE.run(spec, inputs, tiny_scorer)
    assert result.metrics == {"pass_at_1": 0.5, "pass_at_2": 0.5, "pass_at_4": 0.5, "samples_timed_out": 0.0}
    assert [row["passed"] for row in result.rows] == [4, 0]
    assert [row["pass_at_2"] for row in result.rows] == [1.0, 0.0]
    samples = result.rows[0]["completions"]
    assert len(samples) == 4 and len(set(samples)) > 1  # sampled, not four greedy copies
    again = CODE.run(spec, inputs, tiny_scorer)
    assert [row["completions"] for row in again.rows] == [row["completions"] for row in result.rows]
