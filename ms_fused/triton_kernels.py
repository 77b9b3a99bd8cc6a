"""Triton kernels of the `triton` backend (SPEC "Similarities" .. "Gradient"); launchers are in triton_backend.py.

Every similarity tile is S = dot(A_rows, B_cols^T) * (inv_a * inv_b), accumulated in float32 over the same
BLOCK_D-wide K-loop in every kernel, so forward and backward see the same S and mine the same pairs.
Nothing of size N x M is ever written: the forward keeps per-anchor statistics, the backward rebuilds
each tile of the weight matrix G from them.
"""
import triton
import triton.language as tl

INF = tl.constexpr(float("inf"))


# row counts only bound masks: not specialising on their divisibility saves recompilations
@triton.jit(do_not_specialize=["n_rows"])
def row_norms_kernel(x_ptr, norm_ptr, inv_ptr, n_rows, D, stride_n, norm_eps,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """norm = ||x_i||, inv = 1 / max(norm, eps): F.normalize's x / max(||x||, eps)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    row_base = x_ptr + rows.to(tl.int64)[:, None] * stride_n
    sum_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        ks = k + tl.arange(0, BLOCK_D)
        x = tl.load(row_base + ks[None, :],
                    mask=row_ok[:, None] & (ks < D)[None, :], other=0.0).to(tl.float32)
        sum_sq += tl.sum(x * x, axis=1)
    norm = tl.sqrt_rn(sum_sq)
    tl.store(norm_ptr + rows, norm, mask=row_ok)
    tl.store(inv_ptr + rows, tl.div_rn(tl.full([BLOCK_N], 1.0, tl.float32), tl.maximum(norm, norm_eps)), mask=row_ok)


@triton.jit
def _similarity_tile(a_ptr, a_rows, a_ok, stride_an, inv_a, b_ptr, b_rows, b_ok, stride_bn, inv_b, D,
                     BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                     NORMALIZE: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """(BLOCK_A, BLOCK_B) float32 tile of <a_hat_i, b_hat_j>; out-of-range rows/columns give 0."""
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    a_base = a_ptr + a_rows.to(tl.int64)[:, None] * stride_an
    b_base = b_ptr + b_rows.to(tl.int64)[None, :] * stride_bn
    for k in range(0, D, BLOCK_D):
        ks = k + tl.arange(0, BLOCK_D)
        k_ok = ks < D
        a = tl.load(a_base + ks[None, :], mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_base + ks[:, None], mask=k_ok[:, None] & b_ok[None, :], other=0.0)
        if DOT_F32:  # the interpreter's bfloat16 dot is wrong; it gets float32 operands instead
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if NORMALIZE:
        # one product inv_a * inv_b (commutative) so tile (i, j) and tile (j, i) round alike
        acc = acc * (inv_a[:, None] * inv_b[None, :])
    return acc


@triton.jit
def _pair_masks(y_rows, y_cols, rows, cols, own, valid, OWN_MODE: tl.constexpr):
    """SPEC "Pair sets": pos = same label minus the anchor's own copy, neg = other label.

    OWN_MODE 0: nothing removed; 1: self mode (i == j removed); 2: rows are anchors, `own` holds each
    row's own column (or -1); 3: columns are anchors, `own` holds each column's own row (or -1).
    """
    same = y_rows[:, None] == y_cols[None, :]
    neg = valid & (y_rows[:, None] != y_cols[None, :])
    if OWN_MODE == 1:
        pos = valid & same & (rows[:, None] != cols[None, :])
    elif OWN_MODE == 2:
        pos = valid & same & (own[:, None] != cols[None, :])
    elif OWN_MODE == 3:
        pos = valid & same & (rows[:, None] != own[None, :])
    else:
        pos = valid & same
    return pos, neg


@triton.jit
def _hard_masks(S, pos, neg, min_pos, max_neg, eps, MINING: tl.constexpr):
    """SPEC "Mining", thresholds tested as written: S - eps < max_neg, S + eps > min_pos (strict)."""
    if MINING:
        hard_pos = pos & (S - eps < max_neg)
        hard_neg = neg & (S + eps > min_pos)
    else:
        hard_pos = pos
        hard_neg = neg
    return hard_pos, hard_neg


@triton.jit
def _count_non_finite(S, valid):
    """Per row, how many valid entries of S are NaN or +-Inf (SPEC "Bad input": such rows get NaN)."""
    return tl.sum(tl.where(valid & (tl.abs(S) < INF), 0, valid.to(tl.int32)), axis=1)


@triton.jit
def _pair_tile(a_ptr, rows, row_ok, stride_an, inv_a, ya, own, b_ptr, yb_ptr, inv_b_ptr, own_ptr, start, NB,
               stride_bn, D, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
               NORMALIZE: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, OWN_MODE: tl.constexpr,
               OWN_OF_COLUMNS: tl.constexpr):
    """Rows' view of columns [start, start + BLOCK_M): similarities, pair masks, the in-range mask, and the
    columns with their inverse norms (for the backward's second product).

    The own-copy index comes from the rows (`own`) or, when the columns are the anchors
    (OWN_OF_COLUMNS, the dR pass), from `own_ptr` at the columns."""
    cols = start + tl.arange(0, BLOCK_M)
    col_ok = cols < NB
    yb = tl.load(yb_ptr + cols, mask=col_ok, other=0)
    inv_b = tl.load(inv_b_ptr + cols, mask=col_ok, other=1.0)
    S = _similarity_tile(a_ptr, rows, row_ok, stride_an, inv_a, b_ptr, cols, col_ok, stride_bn, inv_b, D,
                         BLOCK_N, BLOCK_M, BLOCK_D, NORMALIZE, DOT_F32, PRECISION)
    valid = row_ok[:, None] & col_ok[None, :]
    if OWN_OF_COLUMNS:
        own_c = tl.load(own_ptr + cols, mask=col_ok, other=-1)
        pos, neg = _pair_masks(ya, yb, rows, cols, own_c, valid, OWN_MODE)
    else:
        pos, neg = _pair_masks(ya, yb, rows, cols, own, valid, OWN_MODE)
    return S, pos, neg, valid, cols, col_ok, inv_b


@triton.jit(do_not_specialize=["N", "M"])
def forward_kernel(q_ptr, r_ptr, inv_q_ptr, inv_r_ptr, yq_ptr, yr_ptr, own_ptr,
                   loss_ptr, min_pos_ptr, max_neg_ptr, lse_pos_ptr, lse_neg_ptr, bad_ptr,
                   N, M, D, stride_qn, stride_rn,
                   alpha, beta, base, eps,
                   OWN_MODE: tl.constexpr, MINING: tl.constexpr, NORMALIZE: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """One program per BLOCK_N anchors: pass 1 finds min_pos / max_neg / non-finite rows, pass 2 the two
    mined log(1 + sum exp) terms A_i, B_i with an online max-shift starting from (max 0, sum 1)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    yq = tl.load(yq_ptr + rows, mask=row_ok, other=0)
    inv_q = tl.load(inv_q_ptr + rows, mask=row_ok, other=1.0)
    own = tl.load(own_ptr + rows, mask=row_ok, other=-1)
    min_pos = tl.full([BLOCK_N], INF, tl.float32)
    max_neg = tl.full([BLOCK_N], -INF, tl.float32)
    n_bad = tl.zeros([BLOCK_N], dtype=tl.int32)

    if MINING:
        for start in range(0, M, BLOCK_M):
            S, pos, neg, valid, _, _, _ = _pair_tile(q_ptr, rows, row_ok, stride_qn, inv_q, yq, own, r_ptr, yr_ptr,
                                                     inv_r_ptr, own_ptr, start, M, stride_rn, D, BLOCK_N, BLOCK_M,
                                                     BLOCK_D, NORMALIZE, DOT_F32, PRECISION, OWN_MODE, False)
            min_pos = tl.minimum(min_pos, tl.min(tl.where(pos, S, INF), axis=1))
            max_neg = tl.maximum(max_neg, tl.max(tl.where(neg, S, -INF), axis=1))
            n_bad += _count_non_finite(S, valid)

    max_pos_z = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_pos = tl.full([BLOCK_N], 1.0, tl.float32)
    max_neg_z = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_neg = tl.full([BLOCK_N], 1.0, tl.float32)
    for start in range(0, M, BLOCK_M):
        S, pos, neg, valid, _, _, _ = _pair_tile(q_ptr, rows, row_ok, stride_qn, inv_q, yq, own, r_ptr, yr_ptr,
                                                 inv_r_ptr, own_ptr, start, M, stride_rn, D, BLOCK_N, BLOCK_M,
                                                 BLOCK_D, NORMALIZE, DOT_F32, PRECISION, OWN_MODE, False)
        if not MINING:
            n_bad += _count_non_finite(S, valid)
        hard_pos, hard_neg = _hard_masks(S, pos, neg, min_pos[:, None], max_neg[:, None], eps, MINING)
        # P and N are disjoint, so one exponent per pair: -alpha(S - base) or beta(S - base)
        z = tl.where(hard_pos, -alpha * (S - base), beta * (S - base))
        new_max_pos = tl.maximum(max_pos_z, tl.max(tl.where(hard_pos, z, -INF), axis=1))
        new_max_neg = tl.maximum(max_neg_z, tl.max(tl.where(hard_neg, z, -INF), axis=1))
        e = tl.exp(z - tl.where(hard_pos, new_max_pos[:, None], new_max_neg[:, None]))
        sum_pos = sum_pos * tl.exp(max_pos_z - new_max_pos) + tl.sum(tl.where(hard_pos, e, 0.0), axis=1)
        sum_neg = sum_neg * tl.exp(max_neg_z - new_max_neg) + tl.sum(tl.where(hard_neg, e, 0.0), axis=1)
        max_pos_z = new_max_pos
        max_neg_z = new_max_neg

    lse_pos = max_pos_z + tl.log(sum_pos)
    lse_neg = max_neg_z + tl.log(sum_neg)
    loss = tl.where(n_bad > 0, float("nan"), lse_pos / alpha + lse_neg / beta)
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(min_pos_ptr + rows, min_pos, mask=row_ok)
    tl.store(max_neg_ptr + rows, max_neg, mask=row_ok)
    tl.store(lse_pos_ptr + rows, lse_pos, mask=row_ok)
    tl.store(lse_neg_ptr + rows, lse_neg, mask=row_ok)
    tl.store(bad_ptr + rows, n_bad, mask=row_ok)


@triton.jit
def _anchor_weights(S, hard_pos, hard_neg, valid, g, lse_pos, lse_neg, bad, alpha, beta, base):
    """SPEC "Gradient": G = -g exp(-alpha(S - base) - A) on hard positives, +g exp(beta(S - base) - B) on
    hard negatives, 0 elsewhere; NaN on every pair of an anchor whose row touched a non-finite S."""
    z = tl.where(hard_pos, -alpha * (S - base) - lse_pos, beta * (S - base) - lse_neg)
    w = tl.exp(z) * tl.where(hard_pos, -g, g)
    w = tl.where(hard_pos | hard_neg, w, 0.0)
    return tl.where(valid & (bad != 0), float("nan"), w)


@triton.jit
def _accumulate_tile(acc, x_dot_dx, W, S, b_ptr, cols, col_ok, stride_bn, inv_b, douts, dout_ok,
                     NORMALIZE: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """acc += W @ b_hat[cols, douts]; x_dot_dx += sum_j W_ij S_ij (= x_hat_i . dx_hat_i once all tiles are in)."""
    b_hat = tl.load(b_ptr + cols.to(tl.int64)[:, None] * stride_bn + douts[None, :],
                    mask=col_ok[:, None] & dout_ok[None, :], other=0.0).to(tl.float32)
    if NORMALIZE:
        x_dot_dx += tl.sum(W * S, axis=1)
        b_hat = b_hat * inv_b[:, None]
    if DOT_F32:
        acc = tl.dot(W, b_hat, acc, input_precision=PRECISION)
    else:  # half-precision operands for the tensor cores; W arrives scaled to |W| <= 2 by g_scale
        dot_ty = b_ptr.dtype.element_ty
        acc = tl.dot(W.to(dot_ty), b_hat.to(dot_ty), acc, input_precision=PRECISION)
    return acc, x_dot_dx


@triton.jit
def _anchor_stats(g_ptr, min_pos_ptr, max_neg_ptr, lse_pos_ptr, lse_neg_ptr, bad_ptr, idx, ok):
    """What the forward saved for anchors `idx`, and their upstream gradient g."""
    return (tl.load(g_ptr + idx, mask=ok, other=0.0), tl.load(min_pos_ptr + idx, mask=ok, other=INF),
            tl.load(max_neg_ptr + idx, mask=ok, other=-INF), tl.load(lse_pos_ptr + idx, mask=ok, other=0.0),
            tl.load(lse_neg_ptr + idx, mask=ok, other=0.0), tl.load(bad_ptr + idx, mask=ok, other=0))


@triton.jit(do_not_specialize=["NA", "NB"])
def backward_kernel(a_ptr, b_ptr, inv_a_ptr, norm_a_ptr, inv_b_ptr, ya_ptr, yb_ptr, own_ptr,
                    g_ptr, g_scale_ptr, min_pos_ptr, max_neg_ptr, lse_pos_ptr, lse_neg_ptr, bad_ptr,
                    da_ptr, NA, NB, D, stride_an, stride_bn, stride_dan,
                    alpha, beta, base, eps, norm_eps,
                    ANCHOR_ROWS: tl.constexpr, ANCHOR_COLS: tl.constexpr, OWN_MODE: tl.constexpr,
                    MINING: tl.constexpr, NORMALIZE: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DOUT: tl.constexpr,
                    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, SKIP_ZERO_TILES: tl.constexpr):
    """dA = W B_hat chained through A's normalisation, for BLOCK_N rows of A and BLOCK_DOUT columns of D.

    Rows of A are anchors (ANCHOR_ROWS: W += G, row statistics), columns of B are anchors (ANCHOR_COLS:
    W += G^T, column statistics), or both (self mode, A = B: W = G + G^T). Every tile is owned by one
    program: no atomics, a fixed summation order. Anchor statistics and g are indexed by anchor.
    Normalisation: dx = (dx_hat - x_hat (x_hat . dx_hat)) / max(|x|, eps), with x_hat . dx_hat = sum_j W_ij S_ij
    so each D-slice needs no other slice; rows with |x| <= eps get dx_hat / eps (F.normalize's clamp).
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < NA
    douts = tl.program_id(1) * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    dout_ok = douts < D
    ya = tl.load(ya_ptr + rows, mask=row_ok, other=0)
    inv_a = tl.load(inv_a_ptr + rows, mask=row_ok, other=1.0)
    if ANCHOR_ROWS:
        own = tl.load(own_ptr + rows, mask=row_ok, other=-1)
        g_r, min_pos_r, max_neg_r, lse_pos_r, lse_neg_r, bad_r = _anchor_stats(
            g_ptr, min_pos_ptr, max_neg_ptr, lse_pos_ptr, lse_neg_ptr, bad_ptr, rows, row_ok)
    else:  # the dR pass: rows are reference rows, the own-copy index comes with the anchor columns
        own = tl.full([BLOCK_N], -1, tl.int64)

    acc = tl.zeros([BLOCK_N, BLOCK_DOUT], dtype=tl.float32)
    x_dot_dx = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, NB, BLOCK_M):
        S, pos, neg, valid, cols, col_ok, inv_b = _pair_tile(
            a_ptr, rows, row_ok, stride_an, inv_a, ya, own, b_ptr, yb_ptr, inv_b_ptr, own_ptr, start, NB, stride_bn, D,
            BLOCK_N, BLOCK_M, BLOCK_D, NORMALIZE, DOT_F32, PRECISION, OWN_MODE, ANCHOR_COLS)
        W = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        if ANCHOR_ROWS:
            hard_pos, hard_neg = _hard_masks(S, pos, neg, min_pos_r[:, None], max_neg_r[:, None], eps, MINING)
            W += _anchor_weights(S, hard_pos, hard_neg, valid, g_r[:, None], lse_pos_r[:, None],
                                 lse_neg_r[:, None], bad_r[:, None], alpha, beta, base)
        if ANCHOR_COLS:
            g_c, min_pos_c, max_neg_c, lse_pos_c, lse_neg_c, bad_c = _anchor_stats(
                g_ptr, min_pos_ptr, max_neg_ptr, lse_pos_ptr, lse_neg_ptr, bad_ptr, cols, col_ok)
            hard_pos, hard_neg = _hard_masks(S, pos, neg, min_pos_c[None, :], max_neg_c[None, :], eps, MINING)
            W += _anchor_weights(S, hard_pos, hard_neg, valid, g_c[None, :], lse_pos_c[None, :],
                                 lse_neg_c[None, :], bad_c[None, :], alpha, beta, base)
        if SKIP_ZERO_TILES:
            # a tile without mined pairs adds nothing: skip its second product (exact; NaN != 0 is kept)
            if tl.sum((W != 0).to(tl.int32)) > 0:
                acc, x_dot_dx = _accumulate_tile(acc, x_dot_dx, W, S, b_ptr, cols, col_ok, stride_bn,
                                                 inv_b, douts, dout_ok, NORMALIZE, DOT_F32, PRECISION)
        else:
            acc, x_dot_dx = _accumulate_tile(acc, x_dot_dx, W, S, b_ptr, cols, col_ok, stride_bn,
                                             inv_b, douts, dout_ok, NORMALIZE, DOT_F32, PRECISION)

    if NORMALIZE:
        norm_a = tl.load(norm_a_ptr + rows, mask=row_ok, other=1.0)
        a_hat = tl.load(a_ptr + rows.to(tl.int64)[:, None] * stride_an + douts[None, :],
                        mask=row_ok[:, None] & dout_ok[None, :], other=0.0).to(tl.float32) * inv_a[:, None]
        x_dot_dx = tl.where(norm_a > norm_eps, x_dot_dx, 0.0)
        acc = (acc - a_hat * x_dot_dx[:, None]) * inv_a[:, None]
    acc = acc * tl.load(g_scale_ptr)
    tl.store(da_ptr + rows.to(tl.int64)[:, None] * stride_dan + douts[None, :],
             acc.to(da_ptr.dtype.element_ty), mask=row_ok[:, None] & dout_ok[None, :])
