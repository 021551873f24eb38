"""Starting a process that the kernel confines: namespaces, a read-only file view, an unprivileged uid, limits, seccomp.

``launch`` starts a command (the code task's program server) so that nothing it does,
in Python or through ``ctypes``, reaches beyond it:

* **user namespace**, and an unprivileged uid: a caller running as root runs the program as
  uid 65534 (``nobody``), mapped in by the caller, so the program owns no file outside and
  ``RLIMIT_NPROC`` applies to it; any other caller runs it as itself, without capabilities.
  Supplementary groups are dropped when the caller is root.
* **mount namespace** with a file view of its own (``pivot_root``): a fresh root holding only
  the system directories (``/usr``, ``/etc``, ``/lib*``, ``/bin``), the interpreter's
  directories (``sys.prefix``, ``sys.base_prefix``, its libraries), a few device nodes
  (``/dev/null``, ``/dev/urandom``, ...), all read-only and ``nosuid``, a ``/proc`` of its
  own, and a small ``tmpfs`` at ``/tmp`` that is its working directory (the only place it
  can write; it vanishes with the namespace). Home directories, the data sets, the run's
  outputs and the host's ``/tmp`` do not exist in it. Hard links cannot cross into it
  (``EXDEV``) and nothing in the view can be written (``EROFS``).
* **PID namespace**: the program cannot address any process outside (``kill``,
  ``pidfd_open``, ``ptrace`` take pids it cannot name), and its init (``_reap``, pid 1)
  ending kills every process in it, so a child that calls ``setsid`` or double-forks dies
  with it.
* **network, IPC, UTS and cgroup namespaces**: no network interface but a loopback that is
  down, no SysV IPC or abstract socket shared with the host.
* **resource limits**: address space, CPU seconds, file size (which also caps captured
  output), processes (counted in its own user namespace), open files, no core dumps.
* **seccomp** (through libseccomp): no ``socket``, no new namespaces, no mounts, no
  ``ptrace``/``process_vm_*``, no kernel keyring, BPF, ``perf_event_open``, io_uring,
  ``userfaultfd`` or module loading; ``no_new_privs`` is set, so no exec gains privileges.

Needs Linux 5.12+ (``mount_setattr``), user namespaces open to the caller (some
containers' seccomp profiles and Ubuntu's AppArmor restriction close them), and
libseccomp 2. ``launch(..., isolated=False)`` skips everything but the limits: the
program then runs as the caller, sees and may write what the caller can, and a child that
calls ``setsid`` survives it.

Why by hand: bubblewrap takes the same steps, but it is not a Python package and, run by
root, it keeps the program at uid 0 (no ``RLIMIT_NPROC``, owner of root's files). The
steps are a dozen kernel calls, made here through ``ctypes`` (Python 3.11 has no
``os.unshare``). Standard library only: the verdict process imports this file by path.
"""

from __future__ import annotations

import errno
import os
import resource
import select
import signal
import sys
import sysconfig

if __package__:  # imported as part of llmexp (the code task, the tests)
    from . import kernel
else:  # loaded by path in the verdict process, which puts this folder first on sys.path
    import kernel

UNPRIVILEGED_ID = 65534  # nobody / nogroup: who root's programs run as
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
DEVICES = ("null", "zero", "full", "random", "urandom")


class Confinement:
    """What the confined process may use. Sizes in MiB; ``cpu_s`` in CPU seconds.

    A plain class: ``dataclasses`` would add 15 ms to each verdict process's start.
    """

    def __init__(self, memory_mb: int, cpu_s: int, file_mb: int, work_mb: int, processes: int, open_files: int = 256):
        self.memory_mb = memory_mb  # address space (RLIMIT_AS)
        self.cpu_s = cpu_s  # SIGXCPU at the limit, SIGKILL a second later
        self.file_mb = file_mb  # any file it writes, its captured output included (RLIMIT_FSIZE)
        self.work_mb = work_mb  # its working directory, all files together (the tmpfs at /tmp)
        self.processes = processes  # processes and threads at once (RLIMIT_NPROC, in its own user namespace)
        self.open_files = open_files


class Launched:
    """A started program: ``status_fd`` turns readable when it has ended; ``stop`` ends it and all it started."""

    def __init__(self, pid: int, status_fd: int, control_fd: int | None):
        self._pid, self.status_fd, self._control_fd = pid, status_fd, control_fd

    def exit_code(self) -> int:
        """Its exit status, negative for a signal (``subprocess``'s convention); call once ``status_fd`` is readable."""
        return int(os.read(self.status_fd, 32) or b"-9")

    def stop(self) -> None:
        """Kill the program and everything it started, and wait until they are gone."""
        if self._control_fd is not None:  # the namespace holder kills its init, which takes the namespace with it
            os.close(self._control_fd)
            self._control_fd = None
        else:
            _kill(self._pid)
        os.waitpid(self._pid, 0)
        os.close(self.status_fd)


def launch(argv: list[str], env: dict[str, str], fds: dict[int, int], limits: Confinement,
           isolated: bool, workdir: str) -> Launched:  # fmt: skip
    """Start ``argv`` with the descriptors ``fds`` (its number -> ours) and nothing else open.

    Isolated, it works in its own ``/tmp`` (``workdir`` is unused); else in ``workdir``.
    Raises ``kernel.IsolationError`` naming the step the kernel refused. The caller must be
    single-threaded (it forks).
    """
    setup_r, setup_w = os.pipe()  # errors of the steps before exec; the program's exec closes it
    status_r, status_w = os.pipe()
    control_r, control_w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        for fd in (setup_r, status_r, control_w):  # the caller's ends
            os.close(fd)
        _run_step(setup_w, lambda: _hold_namespaces(parent, argv, env, fds, limits, isolated, workdir,
                                                    setup_w, status_w, control_r))  # fmt: skip
    for fd in (setup_w, status_w, control_r):
        os.close(fd)
    error = _read_all(setup_r)  # empty: every step passed and the program's exec closed the pipe
    os.close(setup_r)
    if error:
        _kill(pid)
        os.waitpid(pid, 0)
        for fd in (control_w, status_r):
            os.close(fd)
        raise kernel.IsolationError(errno.EPERM, error)
    if isolated:
        return Launched(pid, status_r, control_w)
    os.close(control_w)
    return Launched(pid, status_r, None)


def sandbox_ids() -> tuple:
    """The uid and gid the program runs as: ``nobody`` for root, else the caller's own."""
    if os.geteuid() == 0:
        return UNPRIVILEGED_ID, UNPRIVILEGED_ID
    return os.geteuid(), os.getegid()


def readable_paths() -> list[str]:
    """What the program sees, read-only: the system directories and the interpreter's own (no path twice)."""
    candidates = [path for path in SYSTEM_PATHS if os.path.lexists(path)]
    python = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
              os.path.dirname(sys.executable), *sysconfig.get_paths().values()}  # fmt: skip
    python |= {os.path.realpath(path) for path in python}
    candidates += sorted(path for path in python if os.path.isdir(path) and path != "/")  # "/" would show all
    chosen: list[str] = []
    for path in candidates:
        if not any(path == seen or path.startswith(seen.rstrip("/") + "/") for seen in chosen):
            chosen.append(path)
    return chosen


# ---------------------------------------------------------------------------------------
# The launched side: three processes. The namespace holder (a child of the caller) makes the
# namespaces and the file view; its child is pid 1 of the new PID namespace (the reaper),
# which starts the program and reports how it ended. Each reports a failed step on the
# setup pipe and exits.


def _run_step(report_fd: int, step) -> None:
    """Run ``step`` in a forked child and exit it; an exception is reported on ``report_fd``."""
    try:
        step()
        code = 0
    except BaseException as error:  # everything: the child must never return into the caller's code
        try:
            os.write(report_fd, f"{error}".encode()[:4000] or type(error).__name__.encode())
        finally:
            code = 1
    os._exit(code)


def _hold_namespaces(parent, argv, env, fds, limits, isolated, workdir, setup_w, status_w, control_r):
    _die_with(parent)
    if not isolated:
        _reap(argv, env, fds, limits, isolated, workdir, setup_w, status_w, lifeline=None)
        return
    if os.geteuid() == 0:  # root builds the view as itself (it may read what it binds); the program drops later
        os.setgroups([])
        namespaces = kernel.NAMESPACES & ~kernel.CLONE_NEWUSER
        kernel.check(kernel.libc.unshare(namespaces), "unshare(mount, pid, net, ipc, uts, cgroup namespaces)")
    else:
        namespaces = kernel.NAMESPACES
        kernel.check(kernel.libc.unshare(namespaces), "unshare(user, mount, pid, net, ipc, uts, cgroup namespaces)")
        # dumpable again: else /proc/self is root's
        kernel.check(kernel.libc.prctl(kernel.PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
        _map_own_ids()
    lifeline_r, lifeline_w = os.pipe()
    reaper = os.fork()
    if reaper == 0:
        os.close(lifeline_w)
        _run_step(setup_w, lambda: _reap(argv, env, fds, limits, isolated, "/tmp", setup_w, status_w,
                                          lifeline=lifeline_r))  # fmt: skip
    for fd in (setup_w, status_w, lifeline_r, *set(fds.values())):
        os.close(fd)
    os.read(control_r, 1)  # until the caller closes it (or dies)
    _kill(reaper)  # the init of the PID namespace: its end kills every process in it
    os.waitpid(reaper, 0)  # returns once all of them are gone


def _reap(argv, env, fds, limits, isolated, workdir, setup_w, status_w, lifeline):
    """Start the program and report its exit status; in the PID namespace, this is its init."""
    if lifeline is not None:
        _die_with_lifeline(lifeline)
        _enter_file_view(limits.work_mb, *sandbox_ids())  # here: /proc must be mounted from inside the namespace
    program = os.fork()
    if program == 0:
        _run_step(setup_w, lambda: _exec_program(argv, env, fds, limits, isolated, workdir))
    os.close(setup_w)
    for fd in set(fds.values()):
        os.close(fd)
    while True:  # as pid 1 it also reaps the orphans the program leaves
        pid, status = os.waitpid(-1, 0)
        if pid == program:
            break
    os.write(status_w, str(os.waitstatus_to_exitcode(status)).encode())


def _exec_program(argv, env, fds, limits, isolated, workdir):
    _arrange_fds(fds)
    os.chdir(workdir)
    if isolated:
        os.setsid()  # its own session: signalling its own group does not reach the reaper
        if os.geteuid() == 0:  # root's program: nobody, in a user namespace of its own, which RLIMIT_NPROC counts in
            uid, gid = sandbox_ids()
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            kernel.check(kernel.libc.unshare(kernel.CLONE_NEWUSER), "unshare(user namespace)")
    _set_limits(limits, count_processes=isolated)
    if isolated:
        kernel.restrict_syscalls()
    os.execve(argv[0], list(argv), env)


def _set_limits(limits: Confinement, count_processes: bool) -> None:
    """Resource limits, never above a hard limit already in force.

    ``RLIMIT_NPROC`` counts the processes of the uid in the process's user namespace, so it
    is set only in the isolated program's own one (outside it counts the caller's others).
    """
    wanted = [
        (resource.RLIMIT_AS, limits.memory_mb * 2**20, limits.memory_mb * 2**20),
        (resource.RLIMIT_CPU, limits.cpu_s, limits.cpu_s + 1),
        (resource.RLIMIT_FSIZE, limits.file_mb * 2**20, limits.file_mb * 2**20),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_NOFILE, limits.open_files, limits.open_files),
    ]
    if count_processes:
        wanted.append((resource.RLIMIT_NPROC, limits.processes, limits.processes))
    for which, soft, hard in wanted:
        ceiling = resource.getrlimit(which)[1]
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        resource.setrlimit(which, (soft, hard))


def _arrange_fds(fds: dict[int, int]) -> None:
    """Give the program the descriptors ``fds`` (its number -> ours).

    Every other descriptor of these processes is close-on-exec (Python opens them so,
    PEP 446), so the program starts with exactly these: a test checks it.
    """
    moved = {target: os.dup(source) for target, source in fds.items()}  # off every target number first
    for target, source in moved.items():
        os.dup2(source, target)  # inheritable
        os.close(source)


def _map_own_ids() -> None:
    """Map the caller's uid and gid into the user namespace it has just made (the same numbers inside)."""
    uid, gid = os.geteuid(), os.getegid()  # outside ids until mapped: the kernel shows unmapped ids as 65534
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1\n"), ("gid_map", f"{gid} {gid} 1\n")):
        with open(f"/proc/self/{name}", "w") as handle:
            handle.write(text)


def _enter_file_view(work_mb: int, uid: int, gid: int) -> None:
    """Make a fresh root of read-only binds (``readable_paths``, device nodes), ``/proc`` and a tmpfs ``/tmp``.

    Run by the init of the new PID namespace, whose ``/proc`` it mounts.
    """
    paths = readable_paths()
    kernel.mount(None, "/", None, kernel.MS_REC | kernel.MS_PRIVATE)
    no_devices = kernel.MS_NOSUID | kernel.MS_NODEV
    kernel.mount("tmpfs", "/tmp", "tmpfs", no_devices, "mode=0755")  # the new root, until pivot_root
    os.mkdir("/tmp/oldroot")
    kernel.syscall("pivot_root", b"/tmp", b"/tmp/oldroot")
    os.chdir("/")
    os.mkdir("/tmp")  # the program's working directory, first: an interpreter under /tmp is bound inside it
    kernel.mount("tmpfs", "/tmp", "tmpfs", no_devices, f"size={work_mb}m,nr_inodes=4096,mode=0700,uid={uid},gid={gid}")
    for path in paths:
        source = "/oldroot" + path
        if os.path.islink(source) and path in SYSTEM_PATHS:  # /bin -> usr/bin on merged-/usr systems
            os.symlink(os.readlink(source), path)
            continue
        os.makedirs(path, exist_ok=True)
        kernel.mount(source, path, None, kernel.MS_BIND | kernel.MS_REC)
    os.mkdir("/dev")
    for device in DEVICES:
        if os.path.exists(f"/oldroot/dev/{device}"):
            open(f"/dev/{device}", "w").close()
            kernel.mount(f"/oldroot/dev/{device}", f"/dev/{device}", None, kernel.MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):  # fmt: skip
        os.symlink(target, f"/dev/{name}")
    os.mkdir("/proc")
    # while the old root's /proc is still in view: a user namespace may mount a proc only where one is visible
    kernel.mount("proc", "/proc", "proc", no_devices | kernel.MS_NOEXEC)
    kernel.check(kernel.libc.umount2(b"/oldroot", kernel.MNT_DETACH), "umount2(/oldroot)")
    os.rmdir("/oldroot")
    # everything read-only, but the working directory (not what is bound in it)
    kernel.set_mount_attributes("/", kernel.AT_RECURSIVE, set_=kernel.MOUNT_ATTR_RDONLY | kernel.MOUNT_ATTR_NOSUID)
    kernel.set_mount_attributes("/tmp", 0, clear=kernel.MOUNT_ATTR_RDONLY)
    os.chdir("/tmp")


def _die_with(parent: int) -> None:
    """SIGKILL when the parent dies (and now, if it already has)."""
    kernel.check(kernel.libc.prctl(kernel.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:
        os._exit(1)


def _die_with_lifeline(lifeline: int) -> None:
    """``_die_with`` for the init of a PID namespace, whose parent's pid it cannot see: a pipe only the parent holds."""
    kernel.check(kernel.libc.prctl(kernel.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if select.select([lifeline], [], [], 0)[0]:  # end of file: the parent is gone
        os._exit(1)


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks).decode("utf-8", "replace")
        chunks.append(chunk)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
