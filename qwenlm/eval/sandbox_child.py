"""Runs inside the sandbox's child process, before the untrusted program: applies the limits, then runs it.

Invoked as `python -I sandbox_child.py PROGRAM CPU_SECONDS MEMORY_BYTES MAX_PROCESSES`. Kept to the
standard library and importable by path, without the package.

- time: RLIMIT_CPU (the parent's wall-clock timeout, which kills the whole process group, is the main one);
- memory: RLIMIT_AS; written files: RLIMIT_FSIZE; no core dumps;
- network: a new, empty network namespace (unshare(CLONE_NEWNET); CLONE_NEWUSER too when not root) so
  no address is reachable; where the kernel refuses, an audit hook makes every socket creation raise;
- processes: RLIMIT_NPROC counts the user's processes, but the kernel does not apply it to root, so
  under root an audit hook refuses every new process (fork, spawn, exec, system, subprocess) instead,
  and ctypes, which could get round the hook, cannot be loaded.
"""
import json
import os
import resource
import runpy
import sys

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
_PROCESS_EVENTS = {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system",
                   "subprocess.Popen", "pty.spawn"}


def _new_network_namespace() -> bool:
    import ctypes  # only to call unshare(2); dropped from sys.modules before the program runs
    libc = ctypes.CDLL(None, use_errno=True)
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    return libc.unshare(flags) == 0


def main() -> None:
    program, cpu, memory, nproc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    netns = _new_network_namespace()
    root = os.geteuid() == 0
    with open("isolation.json", "w") as f:
        json.dump({"network": "network namespace" if netns else "audit hook on socket creation",
                   "processes": "audit hook (no new processes)" if root else "RLIMIT_NPROC"}, f)

    def guard(event, args):
        if not netns and event == "socket.__new__":
            raise PermissionError("network access is disabled in the sandbox")
        if root and event in _PROCESS_EVENTS:
            raise PermissionError("starting processes is disabled in the sandbox")
        if root and (event == "ctypes.dlopen" or (event == "import" and args[0] in ("ctypes", "_ctypes"))):
            raise PermissionError("ctypes is disabled in the sandbox")

    for name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[name]  # so a later `import ctypes` goes through the hook
    sys.addaudithook(guard)
    sys.argv = [program]
    runpy.run_path(program, run_name="__main__")


if __name__ == "__main__":
    main()
