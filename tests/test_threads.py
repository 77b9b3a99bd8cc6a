"""First use from many threads at once: every lazy initialisation (backend registry, C++ extension load and
op registration) happens once, and no thread sees it half done."""
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from ms_fused.engine._once import once

# Four threads make the very first call of a fresh process together (the reproducer), each on its
# own copy of one batch; every thread's loss and gradient must equal the float64 reference's.
FIRST_CALL = textwrap.dedent("""
    import sys, threading, torch, ms_fused
    gen = torch.Generator().manual_seed(int(sys.argv[1]))
    x0, y = torch.randn(40, 16, generator=gen), torch.randint(0, 5, (40,), generator=gen)
    bar, out = threading.Barrier(4), {}
    def f(k):
        x = x0.clone().requires_grad_(True)
        bar.wait()
        try:
            loss = ms_fused.multi_similarity_loss(x, y)
            out[k] = (loss.detach(), torch.autograd.grad(loss, x)[0])
        except Exception as e:
            out[k] = repr(e)
    ts = [threading.Thread(target=f, args=(k,)) for k in range(4)]
    [t.start() for t in ts]; [t.join() for t in ts]
    errors = [v for v in out.values() if isinstance(v, str)]
    if errors:
        print("ERROR", errors[0]); sys.exit(0)
    x = x0.double().requires_grad_(True)
    ref = ms_fused.multi_similarity_loss(x, y, backend="reference")
    ref_grad = torch.autograd.grad(ref, x)[0]
    worst = max(max(abs(float(l) - float(ref)) / abs(float(ref)), float((g - ref_grad).norm() / ref_grad.norm()))
                for l, g in out.values())
    print(ms_fused.available_backends("cpu")[0], len(out), worst)
""")


@pytest.mark.parametrize("seed", range(3))
def test_first_call_from_four_threads_in_a_fresh_process(seed):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", FIRST_CALL, str(seed)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    first_backend, calls, worst = out.stdout.split()
    assert first_backend == ("torch" if os.environ.get("MS_FUSED_NO_CPP") == "1" else "cpp")
    assert calls == "4" and float(worst) <= 1e-5


def test_once_runs_the_function_once_for_all_threads():
    started, release, calls = threading.Event(), threading.Event(), []

    @once
    def load(name):
        calls.append(name)
        started.set()
        release.wait()  # every other thread arrives while the first is still inside
        return f"loaded {name}"

    results = []
    threads = [threading.Thread(target=lambda: results.append(load("cpp"))) for _ in range(8)]
    threads[0].start()
    started.wait()
    for t in threads[1:]:
        t.start()
    release.set()
    for t in threads:
        t.join()
    assert calls == ["cpp"] and results == ["loaded cpp"] * 8
    assert load("torch") == "loaded torch" and calls == ["cpp", "torch"]
    assert load.results == {("cpp",): "loaded cpp", ("torch",): "loaded torch"}


def test_calls_from_many_threads_match_one_thread():
    """After the first use: concurrent calls on every CPU backend give the single-thread values."""
    from backends_under_test import CPU_BACKENDS
    from helpers import clustered_batch
    from ms_fused import multi_similarity_loss

    x, y = clustered_batch(64, 8, 5, seed=0, dtype=torch.float32)
    expected = {b: multi_similarity_loss(x, y, backend=b, reduction="none") for b in CPU_BACKENDS}
    got, bar = [], threading.Barrier(2 * len(CPU_BACKENDS))

    def f(backend):
        bar.wait()
        got.append((backend, multi_similarity_loss(x, y, backend=backend, reduction="none")))

    threads = [threading.Thread(target=f, args=(b,)) for b in CPU_BACKENDS for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(got) == len(threads)
    # docs/semantics.md "Reproducibility", repeat: the same call on the same inputs, concurrent or not
    assert all(torch.equal(losses, expected[b]) for b, losses in got)
