"""Shared test data (clustered batches kept away from mining thresholds), the error measure, the tolerance
table and the one comparison of a backend with the float64 `reference`."""
from __future__ import annotations

import importlib.util
import pathlib
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """‖out − ref‖ / max(‖ref‖, floor) in float64; inf when out has a NaN/Inf that ref has not (NaN never passes).

    `floor` keeps a reference that is zero up to rounding (e.g. the gradient of a normalised D=1 row)
    from turning rounding noise into a large relative error."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.equal(torch.isnan(out), torch.isnan(ref)):
        return float("inf")
    keep = ~torch.isnan(ref)
    out, ref = out[keep], ref[keep]
    if not torch.isfinite(out).all():
        return float("inf")
    denom = max(float(ref.norm()), floor)
    diff = float((out - ref).norm())
    return diff if denom == 0 else diff / denom


def clustered(n: int, d: int, n_classes: int, gen: torch.Generator, spread: float = 0.9):
    """Rows around random class centres, so that hard positives and negatives both occur."""
    labels = torch.randint(0, n_classes, (n,), generator=gen)
    centres = torch.randn(n_classes, d, generator=gen, dtype=torch.float64)
    x = centres[labels] + spread * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return x, labels


def fresh_clustered(n: int, d: int, n_classes: int, seed: int, m: Optional[int] = None):
    """(x, y, r, yr): `clustered` rows, a fresh draw each run (`seed` offsets it), with m reference rows of the
    same classes (r, yr None without m). For losses without mining thresholds, which any draw serves."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))) + seed)
    x, y = clustered(n, d, n_classes, gen)
    if m is None:
        return x, y, None, None
    r, yr = clustered(m, d, n_classes, gen)
    return x, y, r, yr


def threshold_gap(q, yq, r=None, yr=None, ref_self_index=None, epsilon: float = 0.1, normalize: bool = True) -> float:
    """Smallest distance (float64) between any S ± ε and the mining extreme it is compared with."""
    self_mode = r is None
    q = q.double()
    r = q if self_mode else r.double()
    yr = yq if self_mode else yr
    if normalize:
        q, r = F.normalize(q, dim=1), F.normalize(r, dim=1)
    S = q @ r.T
    same = yq[:, None] == yr[None, :]
    pos = same.clone()
    idx = torch.arange(q.shape[0]) if self_mode else ref_self_index
    if idx is not None:
        rows = torch.nonzero(idx >= 0).flatten()
        pos[rows, idx[rows]] = False
    neg = ~same
    min_pos = S.masked_fill(~pos, float("inf")).amin(1, keepdim=True)
    max_neg = S.masked_fill(~neg, float("-inf")).amax(1, keepdim=True)
    gap_neg = ((S + epsilon) - min_pos).abs().masked_fill(~neg | ~torch.isfinite(min_pos), float("inf"))
    gap_pos = ((S - epsilon) - max_neg).abs().masked_fill(~pos | ~torch.isfinite(max_neg), float("inf"))
    return float(torch.minimum(gap_neg.min(), gap_pos.min()))


def same_centres(n: int, m: int, d: int, n_classes: int, gen: torch.Generator, spread: float = 0.9):
    """Anchors and reference rows around one set of class centres (as a memory bank of past batches is)."""
    centres = torch.randn(n_classes, d, generator=gen, dtype=torch.float64)
    y, yr = torch.randint(0, n_classes, (n,), generator=gen), torch.randint(0, n_classes, (m,), generator=gen)
    x = centres[y] + spread * torch.randn(n, d, generator=gen, dtype=torch.float64)
    r = centres[yr] + spread * torch.randn(m, d, generator=gen, dtype=torch.float64)
    return x, y, r, yr


def clustered_batch(n: int, d: int, n_classes: int, seed: int, dtype=torch.float64, m: Optional[int] = None,
                    epsilon: float = 0.1, margin: float = 1e-5, normalize: bool = True,
                    shared_centres: bool = False):
    """A clustered batch (self mode, or reference mode with m reference rows) whose pairs all sit at least
    `margin` away from a mining threshold. The reference rows get their own class centres unless
    `shared_centres`.

    Why: a pair within rounding distance of `S ± ε = extreme` is mined by one implementation and not by
    another (different GEMM summation orders), which changes the loss by a whole pair's term. Such draws
    test floating-point luck, not the algorithm, so they are redrawn. Returns (x, y) or (x, y, r, yr).
    """
    gen = torch.Generator().manual_seed(seed)
    for _ in range(500):
        if m is None:
            x, y = clustered(n, d, n_classes, gen)
            if threshold_gap(x, y, epsilon=epsilon, normalize=normalize) > margin:
                return x.to(dtype), y
        else:
            if shared_centres:
                x, y, r, yr = same_centres(n, m, d, n_classes, gen)
            else:
                (x, y), (r, yr) = clustered(n, d, n_classes, gen), clustered(m, d, n_classes, gen)
            if threshold_gap(x, y, r, yr, epsilon=epsilon, normalize=normalize) > margin:
                return x.to(dtype), y, r.to(dtype), yr
    raise RuntimeError("could not draw a batch away from the mining thresholds; lower the margin")


def memory_bank_batch(n: int, m_extra: int, d: int, n_classes: int, seed: int, margin: float = 1e-5):
    """Reference mode where R = [Q; other rows] and anchor i's own copy is row i of R, except for every
    fifth anchor, given -1 (its copy then is a real positive); redrawn away from mining thresholds.
    Returns (x, y, r, yr, ref_self_index)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(200):
        x, y, extra, y_extra = same_centres(n, m_extra, d, n_classes, gen)
        r, yr = torch.cat([x, extra]), torch.cat([y, y_extra])
        ref_self_index = torch.arange(n)
        ref_self_index[::5] = -1
        if threshold_gap(x, y, r, yr, ref_self_index=ref_self_index) > margin:
            return x, y, r, yr, ref_self_index
    raise RuntimeError("could not draw a batch away from the mining thresholds; lower the margin")


# ---- one comparison against the float64 `reference` for every backend -----------------------------------

class Tol(NamedTuple):
    loss: float
    grad: float


# Relative error ‖out − ref‖ / ‖ref‖ allowed against the float64 `reference` on the same rounded inputs,
# by input dtype. Every comparison with the reference uses these numbers, except where a test passes its
# own `tol` and says why. The same numbers bound two results of one backend whose only difference is the
# order of its sums (docs/semantics.md "Reproducibility": e.g. labels that the triton backend's label sort
# orders differently): that is the rounding the float32 line below already covers.
TOLERANCE = {
    # the same float64 operations in another summation order
    torch.float64: Tol(loss=1e-10, grad=1e-10),
    # float32 accumulation over D (S) and over the M terms of each log-sum-exp
    torch.float32: Tol(loss=1e-5, grad=1e-5),
    # float32 compute on the same rounded inputs; the gradient is stored in float16 (unit roundoff 2^-11)
    # and triton's gradient GEMM takes float16 weights (scaled by 2^14 so that none is subnormal) and rows;
    # up to 3.7e-4 seen (triton, GPU rounding under the interpreter)
    torch.float16: Tol(loss=1e-5, grad=2e-3),
    # the gradient is stored in bfloat16 (unit roundoff 2^-9 ≈ 2e-3), and triton's gradient GEMM takes
    # bfloat16 weights and bfloat16 normalised rows (each rounded, as a GPU's tensor cores take them, also
    # under the interpreter); the normalisation chain's projection dx̂ − x̂(x̂·dx̂) removes most of dx̂ on
    # clustered batches, which raises the relative error of what is left: up to 1.0e-2 seen (triton,
    # 36 draws of tests/test_triton_half.py's shapes), 3.5e-3 on the float32-weight backends
    torch.bfloat16: Tol(loss=1e-5, grad=2e-2),
}


# Bounds outside the loss, each with its reason:
def similarity_rounding(dtype: torch.dtype, d: int) -> float:
    """|computed − exact| cosine similarity of two D-dim rows normalised inside and multiplied in the compute
    dtype `dtype`, u its unit roundoff: normalisation ≤ (D/2 + 2)·u per row, the dot product of unit rows
    ≤ D·u (Higham's γ_D), so ≤ (2D + 4)·u, whatever the CPU, BLAS, tiling or summation order. Two rows whose
    exact similarities to a query differ by more than twice this rank the same way in every implementation
    (closer ones are near-ties, docs/semantics.md "Retrieval ranking"); a pair farther than twice this (plus
    the rounding of S ± ε) from a mining threshold is mined alike everywhere."""
    return (2 * d + 4) * torch.finfo(dtype).eps / 2


# a retrieval metric computed in float64 from one ranking by two implementations (or two tilings): sums of
# the same ≤ M terms of size ≤ 1 grouped differently differ by ≲ M·2^-53 ≈ 1e-13 for M ≤ 1000
METRIC_ROUNDING = 1e-12


def similarity_gap(q, r=None, exclude_self: bool = True, normalize: bool = True) -> float:
    """Smallest difference (float64) between the similarities of two reference rows that are not exact copies
    of one another, over every query. Copies count once: they tie exactly by design (docs/semantics.md
    "Retrieval ranking"). Self mode (r None): the query's own row is left out when `exclude_self`, its copies
    stay. A test that compares rankings exactly asserts that this exceeds 2 · similarity_rounding(dtype, D)."""
    self_mode = r is None
    r = q if self_mode else r
    rows, inverse = torch.unique(r.double(), dim=0, return_inverse=True)  # one column per set of copies
    q = q.double()
    if normalize:
        q, rows = F.normalize(q, dim=1), F.normalize(rows, dim=1)
    S = q @ rows.T
    if self_mode and exclude_self:
        alone = torch.bincount(inverse, minlength=rows.shape[0])[inverse] == 1  # own row without copies
        S[torch.arange(q.shape[0])[alone], inverse[alone]] = float("-inf")
    S = S.sort(dim=1, descending=True).values
    S = S[:, : int(torch.isfinite(S).sum(dim=1).min())]
    return float((S[:, :-1] - S[:, 1:]).min()) if S.shape[1] > 1 else float("inf")


def device_of(backend) -> torch.device:
    """Where a backend's test tensors live: the GPU for triton where there is one, else the CPU."""
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def widest_dtype(backend) -> torch.dtype:
    """float64 where `backend` takes it, else float32 (triton)."""
    from ms_fused.engine import backends

    if isinstance(backend, str) and backend != "auto" and \
            backends.unavailable_reason(backend, device_of(backend), torch.float64) is not None:
        return torch.float32
    return torch.float64


def loss_and_grads(backend, x, y, r=None, yr=None, dtype=None, weights=None, grad_ref=True, **kw):
    """Losses of `backend` on x (and r) rounded to `dtype` (default: their own), and the gradients of
    Σ_i w_i ℓ_i with respect to x and, unless grad_ref=False, r.

    `backend` is a backend name, or a callable taking multi_similarity_loss's (embeddings, labels,
    ref_emb, ref_labels, **kw). reduction defaults to "none"; the default weights 0.5 … 1.5 test every
    anchor's upstream gradient, not only 1/N. Returns detached CPU tensors: (loss, (dx,)) in self mode,
    (loss, (dx, dr)) in reference mode, dr None when grad_ref=False.
    """
    from ms_fused import multi_similarity_loss

    device = device_of(backend) if isinstance(backend, str) else x.device
    kw.setdefault("reduction", "none")
    if kw.get("ref_self_index") is not None:
        kw["ref_self_index"] = kw["ref_self_index"].to(device)
    dtype = x.dtype if dtype is None else dtype
    # no copy where dtype and device already match: a strided input must reach the backend as it is
    xs = x.detach().to(dtype).to(device).requires_grad_(True)
    rs = None if r is None else r.detach().to(dtype).to(device).requires_grad_(grad_ref)
    y = y.to(device)
    yr = None if yr is None else yr.to(device)
    if isinstance(backend, str):
        loss = multi_similarity_loss(xs, y, rs, yr, backend=backend, **kw)
    else:
        loss = backend(xs, y, rs, yr, **kw)
    if weights is None:
        weights = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
    leaves = [xs] if rs is None or not grad_ref else [xs, rs]
    grads = torch.autograd.grad((loss * weights.to(loss)).sum(), leaves)
    grads = [g.cpu() for g in grads] + ([None] if rs is not None and not grad_ref else [])
    return loss.detach().cpu(), tuple(grads)


def assert_close(out, ref, dtype: torch.dtype, grad_floor: float = 0.0, tol: Optional[Tol] = None):
    """Two (loss, grads) results agree within TOLERANCE[dtype] (`dtype`: the inputs' dtype), or within `tol`
    where a test's conditioning needs other bounds (the test says why).

    `grad_floor` bounds the gradients' denominator from below where the true gradient is zero up to
    rounding (D = 1: a normalised row is ±1 whatever x is)."""
    tol = TOLERANCE[dtype] if tol is None else tol
    (loss, grads), (ref_loss, ref_grads) = out, ref
    err = rel_err(loss, ref_loss)
    assert err <= tol.loss, f"loss: relative error {err:.3g} > {tol.loss:g} ({dtype})"
    assert len(grads) == len(ref_grads)
    for i, (g, g_ref) in enumerate(zip(grads, ref_grads)):
        if g is None or g_ref is None:
            assert g is None and g_ref is None, f"gradient {i}"
            continue
        err = rel_err(g, g_ref, grad_floor)
        assert err <= tol.grad, f"gradient {i}: relative error {err:.3g} > {tol.grad:g} ({dtype})"


def assert_matches_reference(backend, x, y, r=None, yr=None, dtype=None, grad_floor=0.0, tol=None, **kw):
    """`backend` on x, r rounded to `dtype` (default: widest_dtype(backend)) against the float64 `reference`
    on the same rounded values, within TOLERANCE[dtype]; also checks the output dtypes (float32 loss,
    float64 for float64 inputs; gradients in the input dtype). Returns the backend's (loss, grads)."""
    dtype = widest_dtype(backend) if dtype is None else dtype
    x, r = x.to(dtype), None if r is None else r.to(dtype)
    out = loss_and_grads(backend, x, y, r, yr, **kw)
    ref = loss_and_grads("reference", x, y, r, yr, dtype=torch.float64, **kw)
    assert out[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert all(g is None or g.dtype == dtype for g in out[1])
    assert_close(out, ref, dtype, grad_floor, tol)
    return out


def _gloo_rank(rank: int, worker, world: int, rendezvous: str, out_dir: str) -> None:
    import os
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    result = worker(rank)
    dist.barrier()
    dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def spawn_ranks(worker, world: int, tmp_dir) -> list:
    """Runs worker(rank) in `world` processes joined in one gloo process group (one thread each) and returns
    what each rank's call returned."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_rank, args=(worker, world, str(tmp_dir / "rendezvous"), str(tmp_dir)), nprocs=world, join=True)
    return [torch.load(tmp_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ---- the examples' smoke tests ---------------------------------------------------------------------------

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, argv: list):
    """examples/<name>.py's main(argv), loaded by path; the examples set torch's thread count for themselves,
    so the caller's is restored for the rest of the suite. Returns what main returns."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        return module.main(argv)
    finally:
        torch.set_num_threads(threads)
