"""The kernel calls that confine a process, made through ``ctypes``: the C library, libseccomp, their constants.

``isolation.py`` composes them into a confined launch; ``restrict_syscalls`` is also what a
test loads to close user namespaces as Docker's default profile does. A failed call raises
``IsolationError`` naming it. Standard library only: the verdict process imports this file
by path (through ``isolation.py``), before anything else.
"""

from __future__ import annotations

import ctypes
import errno
import os

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS = 0x00020000, 0x02000000, 0x04000000
CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x08000000, 0x10000000, 0x20000000, 0x40000000
CLONE_NEWTIME = 0x00000080
NAMESPACES = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x1000, 0x4000, 0x40000
MNT_DETACH, AT_FDCWD, AT_RECURSIVE = 2, -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE = 1, 4

DENIED_SYSCALLS = (
    "socket", "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root", "chroot",
    "unshare", "setns", "mount_setattr", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "reboot", "swapon", "swapoff", "acct", "settimeofday", "clock_settime", "clock_adjtime",
    "adjtimex", "syslog", "open_by_handle_at", "name_to_handle_at", "quotactl", "iopl", "ioperm",
    "fanotify_init", "sethostname", "setdomainname", "pidfd_getfd", "kcmp", "lookup_dcookie", "vhangup",
    "mbind", "migrate_pages", "move_pages",
)  # fmt: skip
# clone() flags that make namespaces: refused (clone3 hides its flags in memory, so it answers ENOSYS
# and the C library falls back to clone); the flags are clone's first argument except on s390
_NAMESPACE_FLAGS = (CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID,
                    CLONE_NEWNET, CLONE_NEWTIME)  # fmt: skip
_CLONE_FLAGS_ARG = 1 if os.uname().machine.startswith("s390") else 0

libc = ctypes.CDLL(None, use_errno=True)


class IsolationError(OSError):
    """A confinement step failed: the kernel (or a container around it) does not allow it."""


def not_dumpable() -> None:
    """No process of the same uid may ptrace this one or read its memory through /proc."""
    check(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")


def restrict_syscalls(denied: tuple[str, ...] = DENIED_SYSCALLS) -> None:
    """Load a seccomp filter: ``denied`` system calls and namespace-making ``clone`` fail with EPERM.

    libseccomp numbers the calls for this architecture and kills a thread that calls
    through another ABI (``int 0x80`` on x86_64). Sets ``no_new_privs``.
    """
    lib = _libseccomp()
    context = lib.seccomp_init(0x7FFF0000)  # SCMP_ACT_ALLOW
    if not context:
        raise IsolationError(errno.ENOMEM, "seccomp_init failed")
    try:
        refuse = 0x00050000 | errno.EPERM  # SCMP_ACT_ERRNO(EPERM)
        for name in denied:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number >= 0:  # a call this architecture lacks cannot be made
                _seccompcheck(lib.seccomp_rule_add_array(context, refuse, number, 0, None), f"seccomp rule {name}")
        clone = lib.seccomp_syscall_resolve_name(b"clone")
        for flag in _NAMESPACE_FLAGS:
            compare = _ArgCompare(_CLONE_FLAGS_ARG, 7, flag, flag)  # SCMP_CMP_MASKED_EQ: (arg & flag) == flag
            _seccompcheck(lib.seccomp_rule_add_array(context, refuse, clone, 1, ctypes.byref(compare)), "seccomp clone")
        clone3 = lib.seccomp_syscall_resolve_name(b"clone3")
        if clone3 >= 0:
            _seccompcheck(lib.seccomp_rule_add_array(context, 0x00050000 | errno.ENOSYS, clone3, 0, None), "clone3")
        _seccompcheck(lib.seccomp_load(context), "seccomp_load")
    finally:
        lib.seccomp_release(context)


class _ArgCompare(ctypes.Structure):  # libseccomp's struct scmp_arg_cmp
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]  # fmt: skip


def _libseccomp():
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError as error:
        raise IsolationError(errno.ENOENT, f"libseccomp.so.2 not found ({error}); install libseccomp2") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCompare)]  # fmt: skip
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def _seccompcheck(result: int, what: str) -> None:
    if result < 0:  # libseccomp returns -errno
        raise IsolationError(-result, f"{what}: {os.strerror(-result)}")


def set_mount_attributes(path: str, flags: int, set_: int = 0, clear: int = 0) -> None:
    attributes = (ctypes.c_uint64 * 4)(set_, clear, 0, 0)  # struct mount_attr
    syscall("mount_setattr", AT_FDCWD, path.encode(), flags, attributes, ctypes.sizeof(attributes))


def mount(source: str | None, target: str, kind: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda text: text.encode() if text is not None else None  # noqa: E731
    result = libc.mount(encode(source), encode(target), encode(kind), ctypes.c_ulong(flags), encode(data))
    check(result, f"mount {kind or source} on {target}")


def syscall(name: str, *args) -> int:
    """A system call without a C library wrapper everywhere, numbered for this architecture by libseccomp."""
    number = _libseccomp().seccomp_syscall_resolve_name(name.encode())
    if number < 0:
        raise IsolationError(errno.ENOSYS, f"{name} is not a system call on this architecture")
    return check(libc.syscall(number, *args), name)


def check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise IsolationError(code, f"{what}: {os.strerror(code)}")
    return result
