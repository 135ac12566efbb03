"""Sandbox launcher: isolates this process, then replaces itself with the untrusted program.

Run as ``python -I -S _sandbox_launch.py SPEC_JSON`` by :mod:`llm_pipeline.eval.sandbox`, never
imported by the evaluator: it uses the standard library only, so nothing of the package (or its
dependencies) is loaded into the process that will run model-written code. Order matters:
network namespace (needs privileges) -> Landlock (needs no_new_privs) -> resource limits ->
drop to an unprivileged uid -> exec the program with a minimal environment.
"""

import ctypes
import json
import os
import resource
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_NO_NEW_PRIVS = 38

# Landlock syscalls share these numbers on every architecture.
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
# Filesystem rights that change something (reads and execution stay allowed: Python needs its stdlib).
FS_WRITE_FILE = 1 << 1
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_ALL = sum(1 << b for b in range(6, 13))  # char, dir, reg, sock, fifo, block, symlink
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _errno_text() -> str:
    return os.strerror(ctypes.get_errno())


def isolate_network(libc: ctypes.CDLL) -> str:
    """A fresh network namespace has only a downed loopback: no route anywhere."""
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    if libc.unshare(flags) == 0:
        return "namespace"
    return f"unavailable ({_errno_text()})"


def restrict_filesystem(libc: ctypes.CDLL, scratch: str) -> str:
    """Landlock: writes, deletions and new files only beneath ``scratch`` (and /dev/null); TCP blocked."""
    abi = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        return f"unavailable ({_errno_text()})"
    fs = FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_ALL
    if abi >= 2:
        fs |= FS_REFER
    if abi >= 3:
        fs |= FS_TRUNCATE
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    attr = _RulesetAttr(fs, net)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 4 else 8
    ruleset = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0)
    if ruleset < 0:
        return f"unavailable ({_errno_text()})"
    try:
        for path, rights in ((scratch, fs), ("/dev/null", FS_WRITE_FILE | (fs & FS_TRUNCATE))):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = _PathBeneathAttr(rights, fd)
                if libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0):
                    return f"unavailable (add_rule {path}: {_errno_text()})"
            finally:
                os.close(fd)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
            return f"unavailable (no_new_privs: {_errno_text()})"
        if libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0):
            return f"unavailable (restrict_self: {_errno_text()})"
    finally:
        os.close(ruleset)
    return f"landlock abi {abi}" + (" (tcp blocked)" if net else "")


def set_limits(spec: dict) -> None:
    """Address space, CPU seconds, file size, process count; no core dumps."""
    limits = {
        resource.RLIMIT_AS: spec["memory_bytes"],
        resource.RLIMIT_CPU: spec["cpu_seconds"],
        resource.RLIMIT_FSIZE: spec["file_bytes"],
        resource.RLIMIT_NPROC: spec["max_processes"],
        resource.RLIMIT_CORE: 0,
    }
    for which, value in limits.items():
        hard = value + 1 if which == resource.RLIMIT_CPU else value  # SIGXCPU first, then SIGKILL
        resource.setrlimit(which, (value, hard))


def main() -> None:
    spec = json.loads(sys.argv[1])
    libc = ctypes.CDLL(None, use_errno=True)
    # Opened before Landlock and the uid drop, which would forbid it; the program never sees it.
    report_file = open(spec["report"], "w")  # noqa: SIM115
    report = {"network": isolate_network(libc) if spec["isolate_network"] else "not requested"}
    report["filesystem"] = restrict_filesystem(libc, spec["scratch"]) if spec["landlock"] else "not requested"
    set_limits(spec)
    uid = spec.get("uid")
    if uid is not None and os.geteuid() == 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    report["uid"] = os.getuid()
    with report_file:
        json.dump(report, report_file)
    os.chdir(spec["scratch"])
    env = {"PATH": "/usr/bin:/bin", "HOME": spec["scratch"], "TMPDIR": spec["scratch"], "LANG": "C.UTF-8"}
    os.execve(spec["python"], [spec["python"], "-I", "-S", "-B", spec["program"]], env)


if __name__ == "__main__":
    main()
