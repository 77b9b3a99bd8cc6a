"""The JIT build's lock and first-use message (ms_fused/engine/_jit_lock.py), with a stand-in for the compiler: a stale
torch lock is removed and the build announced once, an up-to-date build loads silently, a live builder is
waited for (saying so), one that never finishes is given up on. tests/test_jit_first_use.py (slow) kills a
real build midway."""
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from ms_fused.engine import _jit_lock
from ms_fused.engine.cpp import backend as cpp_backend

pytestmark = pytest.mark.skipif(_jit_lock.fcntl is None, reason="no fcntl.flock on this platform")


def messages(captured) -> list:
    return [line for line in captured.err.splitlines() if line.startswith("ms_fused:")]


def make_sources(tmp_path):
    src = tmp_path / "src.cpp"
    src.write_text("// a source\n")
    return [str(src)]


def fake_build(library, calls):
    """What torch's load does, minus the compiler: it would wait forever on its lock file, so none may be left."""
    def build():
        assert not os.path.exists(os.path.join(os.path.dirname(library), _jit_lock.TORCH_LOCK))
        calls.append(time.monotonic())
        with open(library, "w") as f:
            f.write("built")
    return build


def test_stale_lock_is_removed_and_the_build_announced_once(tmp_path, capfd):
    build_dir = tmp_path / "ms_fused_C"
    build_dir.mkdir()
    (build_dir / _jit_lock.TORCH_LOCK).write_text("")  # what a killed build leaves
    library, calls = str(build_dir / "ms_fused_C.so"), []
    _jit_lock.guarded_build(str(build_dir), library, make_sources(tmp_path), fake_build(library, calls))
    assert len(calls) == 1
    said = messages(capfd.readouterr())
    assert len(said) == 1, said
    assert "interrupted build" in said[0] and "compiling the C++ extension" in said[0]


def test_up_to_date_build_loads_silently(tmp_path, capfd):
    sources = make_sources(tmp_path)
    build_dir = tmp_path / "ms_fused_C"
    build_dir.mkdir()
    library, calls = str(build_dir / "ms_fused_C.so"), []
    (build_dir / "ms_fused_C.so").write_text("built earlier")
    os.utime(sources[0], (time.time() - 60, time.time() - 60))
    _jit_lock.guarded_build(str(build_dir), library, sources, fake_build(library, calls))
    assert len(calls) == 1
    assert messages(capfd.readouterr()) == []


def test_an_edited_source_is_announced(tmp_path, capfd):
    sources = make_sources(tmp_path)
    build_dir = tmp_path / "ms_fused_C"
    build_dir.mkdir()
    library, calls = str(build_dir / "ms_fused_C.so"), []
    (build_dir / "ms_fused_C.so").write_text("built earlier")
    os.utime(library, (time.time() - 60, time.time() - 60))
    _jit_lock.guarded_build(str(build_dir), library, sources, fake_build(library, calls))
    said = messages(capfd.readouterr())
    assert len(said) == 1 and "compiling the C++ extension" in said[0] and "interrupted" not in said[0], said


HOLDER = textwrap.dedent("""
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"pid %d on a test host" % os.getpid())
    torch_lock = os.path.join(os.path.dirname(sys.argv[1]), "lock")
    open(torch_lock, "w").close()  # torch's lock, as a live build has it
    print("held", flush=True)
    sys.stdin.readline()  # "build" until told to finish
    os.remove(torch_lock)
""")


def start_holder(build_dir):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(build_dir / _jit_lock.OUR_LOCK)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_live_build_is_waited_for_saying_so(tmp_path, monkeypatch):
    build_dir = tmp_path / "ms_fused_C"
    build_dir.mkdir()
    holder = start_holder(build_dir)
    said = []

    def say(message):
        said.append(message)
        if message.startswith("waiting for"):  # the live build finishes only once this process waits for it
            holder.stdin.write("done\n")
            holder.stdin.flush()

    monkeypatch.setattr(_jit_lock, "say", say)
    library, calls = str(build_dir / "ms_fused_C.so"), []
    try:
        _jit_lock.guarded_build(str(build_dir), library, make_sources(tmp_path), fake_build(library, calls))
    finally:
        holder.kill()
        holder.wait()
    assert len(calls) == 1
    # the holder "built" nothing here, so this process compiles after it: two lines, each said once
    assert len(said) == 2 and said[0].startswith(f"waiting for pid {holder.pid} on a test host"), said
    assert said[1].startswith("compiling the C++ extension"), said


def test_a_build_that_never_ends_is_given_up(tmp_path):
    build_dir = tmp_path / "ms_fused_C"
    build_dir.mkdir()
    holder = start_holder(build_dir)
    library, calls = str(build_dir / "ms_fused_C.so"), []
    try:
        with pytest.raises(TimeoutError, match=f"pid {holder.pid} on a test host has held the build lock"):
            _jit_lock.guarded_build(str(build_dir), library, make_sources(tmp_path), fake_build(library, calls),
                                    wait_s=0.5)
    finally:
        holder.kill()
        holder.wait()
    assert calls == []


def test_jit_build_uses_torchs_build_directory(tmp_path, monkeypatch, capfd):
    """cpp_backend._jit_build clears the stale lock where torch's load looks for it (TORCH_EXTENSIONS_DIR)."""
    import torch.utils.cpp_extension as ext

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build_dir = tmp_path / "ms_fused_C"
    build_dir.mkdir()
    (build_dir / _jit_lock.TORCH_LOCK).write_text("")
    loaded = []

    def fake_load(name, sources, extra_cflags, extra_ldflags, build_directory):
        assert build_directory == str(build_dir) and name == "ms_fused_C"
        assert not os.path.exists(os.path.join(build_directory, _jit_lock.TORCH_LOCK))
        assert any(s.endswith("ms_loss_cpu.cpp") for s in sources)
        loaded.append(name)

    monkeypatch.setattr(ext, "load", fake_load)
    cpp_backend._jit_build()
    assert loaded == ["ms_fused_C"]
    said = messages(capfd.readouterr())
    assert len(said) == 1 and "interrupted build" in said[0] and str(build_dir) in said[0], said


def test_a_failed_lock_falls_back_to_torch_with_one_warning(monkeypatch):
    """A build lock that cannot be had (here: given up on) is the backend's reason, warned once; "auto" goes on."""
    import ms_fused

    monkeypatch.setitem(sys.modules, "ms_fused._C", None)
    monkeypatch.delattr(ms_fused, "_C", raising=False)

    def timed_out():
        raise TimeoutError("pid 1 on a test host has held the build lock /x/ms_fused.flock for more than 600 s")

    monkeypatch.setattr(cpp_backend, "_jit_build", timed_out)
    monkeypatch.setattr(cpp_backend._load, "results", {})
    with pytest.warns(RuntimeWarning, match="TimeoutError: pid 1 on a test host has held the build lock"):
        reason = cpp_backend.unavailable_reason(torch.device("cpu"))
    assert "held the build lock" in reason
