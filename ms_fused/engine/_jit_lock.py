"""One JIT build of the C++ extension at a time, announced, and never blocked by an interrupted one.

torch.utils.cpp_extension.load guards its build directory with a `lock` file that only the builder removes:
a build that is killed (Ctrl-C at the wrong moment, a timeout, SIGKILL) leaves it behind, and every later
load() in every process waits for it forever. Here every build runs while holding an OS lock (fcntl.flock)
on a file beside it, which the kernel releases when its holder dies. Whoever holds that OS lock is the only
process that can be building, so a torch `lock` it finds is stale and is removed before the build.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from typing import Callable, Iterable

try:
    import fcntl
except ImportError:  # Windows: no flock; a leftover lock is then reported, never waited on
    fcntl = None

TORCH_LOCK = "lock"  # torch.utils.cpp_extension's FileBaton in the build directory
OUR_LOCK = "ms_fused.flock"
# a 2-core machine's JIT build of csrc/ (README "Install"); more cores take less
BUILD_TIME_HINT = "about a minute on 2 cores"
POLL_S = 0.2


def say(message: str) -> None:
    """One line on stderr, at once (a build then keeps the process silent for a while)."""
    print(f"ms_fused: {message}", file=sys.stderr, flush=True)


def up_to_date(library: str, inputs: Iterable[str]) -> bool:
    """Whether the built library exists and is newer than every source it is built from."""
    try:
        built = os.path.getmtime(library)
    except OSError:
        return False
    return all(os.path.getmtime(path) <= built for path in inputs)


def _holder(lock_path: str) -> str:
    try:
        with open(lock_path) as f:
            return f.read().strip() or "another process"
    except OSError:
        return "another process"


def _acquire(fd: int, lock_path: str, wait_s: float) -> None:
    """Take the OS lock; while a live process builds, wait for it (saying so once), at most `wait_s`."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    say(f"waiting for {_holder(lock_path)}, which is compiling the C++ extension ({BUILD_TIME_HINT})")
    deadline = time.monotonic() + wait_s
    while True:
        time.sleep(POLL_S)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{_holder(lock_path)} has held the build lock {lock_path} for more than "
                                   f"{wait_s:.0f} s") from None


def guarded_build(build_dir: str, library: str, inputs: Iterable[str], build: Callable[[], None],
                  wait_s: float = 600.0) -> None:
    """Run `build` (torch's load of the extension into `build_dir`) under the OS lock.

    Says once, on stderr, when the library will be compiled (missing or older than `inputs`) and when a stale
    torch lock was removed; says nothing when the library is up to date. Raises (never hangs) when the lock
    cannot be had: the caller then falls back to the `torch` backend."""
    inputs = list(inputs)
    os.makedirs(build_dir, exist_ok=True)
    torch_lock = os.path.join(build_dir, TORCH_LOCK)
    if fcntl is None:
        if os.path.exists(torch_lock):
            raise RuntimeError(f"{torch_lock} exists: another build is running, or one was interrupted "
                               "(then delete that file)")
        _announce(build_dir, library, inputs, stale=False)
        build()
        return
    lock_path = os.path.join(build_dir, OUR_LOCK)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _acquire(fd, lock_path, wait_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        stale = os.path.exists(torch_lock)
        if stale:
            os.remove(torch_lock)
        _announce(build_dir, library, inputs, stale)
        build()
    finally:
        os.close(fd)  # releases the OS lock


def _announce(build_dir: str, library: str, inputs: list, stale: bool) -> None:
    removed = "removed the lock left by an interrupted build; " if stale else ""
    if not up_to_date(library, inputs):
        say(f"{removed}compiling the C++ extension for the `cpp` backend, once ({BUILD_TIME_HINT}; cached in "
            f"{build_dir})")
    elif stale:
        say(f"removed the lock left by an interrupted build in {build_dir}")
