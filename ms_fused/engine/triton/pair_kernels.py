"""Triton kernels of the pair-weighting losses (docs/semantics.md "Pair-weighting losses") on the MS loss's
engine (ms_kernels.py): the same label order, column tiles, S, pair masks, column splits and gradient
accumulation. What makes a loss is written once, in the first functions below: its base-2 logits of S for a
positive and for a negative pair (`_logits`) and the weight dL/dS of a pair from its anchor's saved factors
(`_pair_weights`, `_negative_weights`); the loss of an anchor from its row statistics is
`_anchor_loss`. A loss is a constexpr LOSS (SUPCON, NTXENT, CIRCLE, as pair_engine.LOSS_IDS), with
two parameters p0, p1 (temperature, 0 or gamma, m).

Forward: pair_sweep_kernel, program (anchor block, column split): over the split's columns the online
log-sum-exps (base 2) of the negatives' logits and (SupCon, Circle) of the positives'; the positives' count and S sum and the same-label count. Tiles without one of the block's
labels hold negatives only and skip every compare. pair_finish_kernel: the splits combined in split order,
then (NT-Xent) a pass over the block's band of positives for its sums of softplus and sigmoid, and each
anchor's loss and the factors its backward needs. Backward: pair_backward_kernel (one S recompute per tile,
W = G, G^T or G + G^T, as backward_kernel) and combine_grad_kernel for split columns.

Saved per anchor (float32, label order; rows FACTOR, OFFSET_POS, OFFSET_NEG, EXTRA of pair_engine):
f (the weight's factor without the upstream gradient), the positives' and negatives' base-2 exponent offsets
and one loss-specific value:
  SupCon   f = 1/t (0 without positives), offsets L2 (the base-2 LSE over P u N), EXTRA = 1/|P|
  NT-Xent  f = 1/t, offsets L2 (over N), EXTRA = W = sum_p sigmoid(L - z_p)
  Circle   f = softplus'(A + B) (0 without positives or negatives), offsets A2, B2, EXTRA unused
"""
import triton
import triton.language as tl

from .ms_kernels import (INF, REF_SELF_INDEX_OF_COLS, REF_SELF_INDEX_OF_ROWS, _accumulate, _anchor_block,
                         _band_chunk, _band_rows, _band_tile, _column_tile, _finish_rows, _pair_masks)

SUPCON = tl.constexpr(0)
NTXENT = tl.constexpr(1)
CIRCLE = tl.constexpr(2)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)  # torch's F.softplus default, which pml's CircleLoss uses


# ---- what makes a loss ---------------------------------------------------------------------------------

@triton.jit
def _logits(S, p0, p1, LOSS: tl.constexpr):
    """Base-2 logits (z_pos, z_neg) of S: SupCon, NT-Xent S/t log2(e) (p0 = t) for both; Circle
    -g relu(1 + m - S) (S - 1 + m) and g relu(S + m) (S - m), g = gamma log2(e) (p0 = gamma, p1 = m)."""
    if LOSS == CIRCLE:
        g2 = p0 * LOG2E
        z_pos = -(g2 * tl.maximum(1.0 + p1 - S, 0.0)) * (S - (1.0 - p1))
        z_neg = (g2 * tl.maximum(S + p1, 0.0)) * (S - p1)
    else:
        z_pos = S * (LOG2E / p0)
        z_neg = z_pos
    return z_pos, z_neg


@triton.jit
def _negative_weights(S, f, off_neg, extra, p0, p1, LOSS: tl.constexpr):
    """dl_i/dS_in of negative pairs (docs/semantics.md "Pair-weighting losses"): SupCon f e^(z - L),
    NT-Xent f W e^(z - L), Circle f gamma relu(S + m) e^(z_n - B); f, off_neg, extra broadcast from the anchor."""
    _, z_neg = _logits(S, p0, p1, LOSS)
    e = tl.exp2(z_neg - off_neg)
    if LOSS == SUPCON:
        w = f * e
    elif LOSS == NTXENT:
        w = (f * extra) * e
    else:
        w = (f * p0) * tl.maximum(S + p1, 0.0) * e
    return w


@triton.jit
def _pair_weights(S, pos, neg, f, off_pos, off_neg, extra, p0, p1, LOSS: tl.constexpr):
    """dl_i/dS_ij of a tile with its pair masks, one exp2 per pair (that of its kind), 0 off the pairs:
    on positives SupCon f (e^(z - L) - 1/|P|), NT-Xent -f sigmoid(L - z) = -f / (1 + e^(z - L)),
    Circle -f gamma relu(1 + m - S) e^(z_p - A); on negatives as _negative_weights."""
    z_pos, z_neg = _logits(S, p0, p1, LOSS)
    e = tl.exp2(tl.where(pos, z_pos - off_pos, z_neg - off_neg))
    if LOSS == SUPCON:
        w = f * (e - tl.where(pos, extra, 0.0))
    elif LOSS == NTXENT:
        w = tl.where(pos, -f / (1.0 + e), (f * extra) * e)
    else:
        w = (f * p0) * tl.where(pos, -tl.maximum(1.0 + p1 - S, 0.0), tl.maximum(S + p1, 0.0)) * e
    return tl.where(pos | neg, w, 0.0)


@triton.jit
def _softplus2(x):
    """ln(1 + 2^x), exact to float32 rounding for every x (log1p written out: u = 1 + t rounds, and
    ln(u) - ((u - 1) - t) / u corrects the rounding)."""
    t = tl.exp2(-tl.abs(x))
    u = 1.0 + t
    log1p = tl.where(u == 1.0, t, tl.log(u) - ((u - 1.0) - t) / u)
    return tl.maximum(x, 0.0) * LN2 + log1p


@triton.jit
def _anchor_loss(lse_neg, lse_pos, n_pos, n_neg, sum_pos, band_loss, band_weight, p0,
                 LOSS: tl.constexpr):
    """Each anchor's loss and saved factors (f, off_pos, off_neg, extra) from its row statistics (base 2):
    SupCon l = L - mean_P S/t (0 without positives); NT-Xent l = sum_p softplus(L - z_p) (the band pass's
    band_loss; W = band_weight); Circle l = softplus(A + B) as torch's (its argument above 20), 0 without
    positives or without negatives."""
    if LOSS == SUPCON:  # L over P u N from the sweep's LSEs over P and over N
        top = tl.maximum(lse_pos, lse_neg)
        top = tl.where(top == -INF, 0.0, top)
        total = top + tl.log2(tl.exp2(lse_pos - top) + tl.exp2(lse_neg - top))
        has = n_pos > 0
        count = tl.maximum(n_pos, 1).to(tl.float32)
        loss = tl.where(has, total * LN2 - sum_pos / (p0 * count), 0.0)
        f = tl.where(has, 1.0 / p0, 0.0)
        return loss, f, total, total, 1.0 / count
    elif LOSS == NTXENT:
        return band_loss, tl.zeros_like(lse_neg) + 1.0 / p0, lse_neg, lse_neg, band_weight
    else:
        has = (n_pos > 0) & (n_neg > 0)
        x = tl.where(has, (lse_pos + lse_neg) * LN2, 0.0)
        above = x > SOFTPLUS_THRESHOLD
        loss = tl.where(above, x, _softplus2(x * LOG2E))
        slope = tl.where(above, 1.0, 1.0 / (1.0 + tl.exp2(-x * LOG2E)))
        return tl.where(has, loss, 0.0), tl.where(has, slope, 0.0), lse_pos, lse_neg, tl.zeros_like(lse_neg)


# ---- the engine's passes -------------------------------------------------------------------------------

@triton.jit
def _add_exp2(shift, total, z, keep, S, FLAG_NON_FINITE: tl.constexpr):
    """Online log-sum-exp in base 2 from shift = -Inf (an empty row stays at total 0): total = sum over the
    kept z seen of 2^(z - shift), shift their maximum. FLAG_NON_FINITE: the total turns NaN once any S of the
    row is NaN or +-Inf, kept or not (S * 0 is NaN there; ms_kernels._add_exp2 says why)."""
    new_shift = tl.maximum(shift, tl.max(tl.where(keep, z, -INF), axis=1))
    ref = tl.where(new_shift == -INF, 0.0, new_shift)  # no -Inf - -Inf while a row has kept nothing
    terms = tl.exp2(tl.where(keep, z - ref[:, None], -INF))
    if FLAG_NON_FINITE:
        terms = terms + S * 0.0
    return new_shift, total * tl.exp2(shift - ref) + tl.sum(terms, axis=1)


@triton.jit(do_not_specialize=["NA", "NB", "cols_per_split"])
def pair_sweep_kernel(a_ptr, a_perm_ptr, inv_a_ptr, ya_ptr, ref_self_index_ptr,
                      b_ptr, b_perm_ptr, inv_b_ptr, yb_ptr, part_ptr, count_part_ptr,
                      NA, NB, D_vecs, stride_a_vecs, stride_b_vecs, cols_per_split, p0, p1,
                      LOSS: tl.constexpr, REF_SELF_INDEX_MODE: tl.constexpr, NORMALIZE: tl.constexpr,
                      DOT_F32: tl.constexpr, RESIDENT: tl.constexpr, ALIGN: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Forward stage 1, program (anchor block, column split): per anchor over the split's columns, part_ptr
    (5, splits, NA) float32 gets the negatives' shift and sum, the positives' shift and sum (SupCon, Circle;
    else unwritten) and the positives' S sum; count_part_ptr (2, splits, NA) int32 the positives
    and the same-label columns (own copy included). Sums are NaN for a row whose S holds a NaN or Inf.
    A tile is masked (label and bounds compares) when it holds one of the block's labels or the split's end,
    as in backward_kernel: the block's labels are [y_lo, y_hi] (codes, sorted; other labels' are negative)."""
    D, stride_a, stride_b = D_vecs * ALIGN, stride_a_vecs * ALIGN, stride_b_vecs * ALIGN
    row0 = tl.program_id(0) * BLOCK_N
    split = tl.program_id(1)
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < NA
    inv_a = tl.load(inv_a_ptr + rows, mask=row_ok, other=1.0)
    ya = tl.load(ya_ptr + rows, mask=row_ok, other=-1)
    a_off, a_ok, a_res = _anchor_block(a_ptr, a_perm_ptr, row0, NA, D, stride_a, BLOCK_N, BLOCK_D, DOT_F32, RESIDENT)
    if REF_SELF_INDEX_MODE == REF_SELF_INDEX_OF_ROWS:
        ref_self_index = tl.load(ref_self_index_ptr + rows, mask=row_ok, other=-1)
    else:
        ref_self_index = rows
    y_lo = tl.min(tl.where(row_ok & (ya >= 0), ya, 2147483647))
    y_hi = tl.max(tl.where(row_ok, ya, -1))
    neg_shift = tl.full([BLOCK_N], -INF, tl.float32)
    neg_total = tl.zeros([BLOCK_N], dtype=tl.float32)
    pos_shift = tl.full([BLOCK_N], -INF, tl.float32)
    pos_total = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_pos = tl.zeros([BLOCK_N], dtype=tl.float32)
    n_pos = tl.zeros([BLOCK_N], dtype=tl.int32)
    n_same = tl.zeros([BLOCK_N], dtype=tl.int32)
    c0 = split * cols_per_split
    c1 = tl.minimum(c0 + cols_per_split, NB)
    for start in range(c0, c1, BLOCK_M):
        cols, col_ok, b_off, inv_b, yb, S, b_res = _column_tile(
            a_ptr, a_off, a_ok, a_res, a_off, a_ok, a_res, inv_a, b_ptr, b_perm_ptr, inv_b_ptr, yb_ptr,
            stride_b, start, c1, D, BLOCK_N, BLOCK_M, BLOCK_D, 1, NORMALIZE, DOT_F32, RESIDENT)
        z_pos, z_neg = _logits(S, p0, p1, LOSS)
        masked = (tl.sum(((yb >= y_lo) & (yb <= y_hi)).to(tl.int32)) > 0) | (start + BLOCK_M > c1)
        if masked:
            valid = row_ok[:, None] & col_ok[None, :]
            pos, neg = _pair_masks(ya, yb, rows, cols, ref_self_index, cols, valid, True, REF_SELF_INDEX_MODE)
            neg_shift, neg_total = _add_exp2(neg_shift, neg_total, z_neg, neg, S, True)
            if LOSS != NTXENT:
                pos_shift, pos_total = _add_exp2(pos_shift, pos_total, z_pos, pos, S, False)
            n_pos += tl.sum(pos.to(tl.int32), axis=1)
            n_same += tl.sum((valid & (ya[:, None] == yb[None, :])).to(tl.int32), axis=1)
            sum_pos += tl.sum(tl.where(pos, S, 0.0), axis=1)
        else:
            neg_shift, neg_total = _add_exp2(neg_shift, neg_total, z_neg, S == S, S, True)
    part = split * NA + rows
    parts = tl.num_programs(1) * NA
    tl.store(part_ptr + part, neg_shift, mask=row_ok)
    tl.store(part_ptr + parts + part, neg_total, mask=row_ok)
    if LOSS != NTXENT:
        tl.store(part_ptr + 2 * parts + part, pos_shift, mask=row_ok)
        tl.store(part_ptr + 3 * parts + part, pos_total, mask=row_ok)
    tl.store(part_ptr + 4 * parts + part, sum_pos, mask=row_ok)
    tl.store(count_part_ptr + part, n_pos, mask=row_ok)
    tl.store(count_part_ptr + parts + part, n_same, mask=row_ok)


@triton.jit
def _lse_of_parts(shift_ptr, sum_ptr, rows, row_ok, NA, n_parts, BLOCK_N: tl.constexpr):
    """log2 of the sum of partial sums (part k: sum_k 2^(z - shift_k)), added in part order (deterministic);
    -Inf for an empty row, NaN for a flagged one."""
    shift = tl.full([BLOCK_N], -INF, tl.float32)
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k in range(0, n_parts):
        shift_k = tl.load(shift_ptr + k * NA + rows, mask=row_ok, other=-INF)
        new_shift = tl.maximum(shift, shift_k)
        ref = tl.where(new_shift == -INF, 0.0, new_shift)
        total = (total * tl.exp2(shift - ref)
                 + tl.load(sum_ptr + k * NA + rows, mask=row_ok, other=0.0) * tl.exp2(shift_k - ref))
        shift = new_shift
    return tl.where(shift == -INF, 0.0, shift) + tl.log2(total)


@triton.jit(do_not_specialize=["NA", "NB", "n_splits"])
def pair_finish_kernel(a_ptr, a_perm_ptr, inv_a_ptr, ya_ptr, ref_self_index_ptr, band_lo_ptr, band_hi_ptr,
                       b_ptr, b_perm_ptr, inv_b_ptr, yb_ptr, part_ptr, count_part_ptr,
                       loss_ptr, stats_ptr, counts_ptr,
                       NA, NB, D_vecs, stride_a_vecs, stride_b_vecs, n_splits, p0, p1,
                       LOSS: tl.constexpr, REF_SELF_INDEX_MODE: tl.constexpr, NORMALIZE: tl.constexpr,
                       DOT_F32: tl.constexpr, RESIDENT: tl.constexpr, ALIGN: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Forward stage 2, one program per anchor block: the sweep's splits combined in split order; NT-Xent
    then passes over the block's band (its positives) for sum_p softplus(L - z_p) and sum_p sigmoid(L - z_p);
    each anchor's loss goes to its input row, its saved factors (4, NA) to stats_ptr and its counts |P_i|,
    |N_i| (2, NA) int32 to counts_ptr, in label order."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < NA
    parts = n_splits * NA
    lse_neg = _lse_of_parts(part_ptr, part_ptr + parts, rows, row_ok, NA, n_splits, BLOCK_N)
    if LOSS != NTXENT:
        lse_pos = _lse_of_parts(part_ptr + 2 * parts, part_ptr + 3 * parts, rows, row_ok, NA, n_splits, BLOCK_N)
    else:
        lse_pos = lse_neg
    sum_pos = tl.zeros([BLOCK_N], dtype=tl.float32)
    n_pos = tl.zeros([BLOCK_N], dtype=tl.int32)
    n_same = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k in range(0, n_splits):
        sum_pos += tl.load(part_ptr + 4 * parts + k * NA + rows, mask=row_ok, other=0.0)
        n_pos += tl.load(count_part_ptr + k * NA + rows, mask=row_ok, other=0)
        n_same += tl.load(count_part_ptr + parts + k * NA + rows, mask=row_ok, other=0)
    band_loss = tl.zeros([BLOCK_N], dtype=tl.float32)
    band_weight = tl.zeros([BLOCK_N], dtype=tl.float32)
    if LOSS == NTXENT:
        D, stride_a, stride_b = D_vecs * ALIGN, stride_a_vecs * ALIGN, stride_b_vecs * ALIGN
        row0 = tl.program_id(0) * BLOCK_N
        c0, c1 = _band_chunk(band_lo_ptr, band_hi_ptr, row0, NA, 1, BLOCK_N, BLOCK_M)
        inv_a, ya, ref_self_index, a_off, a_res = _band_rows(
            a_ptr, a_perm_ptr, inv_a_ptr, ya_ptr, ref_self_index_ptr, row0, NA, D, stride_a, BLOCK_N, BLOCK_D,
            DOT_F32, RESIDENT)
        for start in range(c0, c1, BLOCK_M):
            S, pos = _band_tile(a_ptr, a_off, a_res, inv_a, ya, rows, row_ok, ref_self_index, b_ptr, b_perm_ptr,
                                inv_b_ptr, yb_ptr, stride_b, start, c1, D, REF_SELF_INDEX_MODE, NORMALIZE,
                                DOT_F32, RESIDENT, BLOCK_N, BLOCK_M, BLOCK_D)
            z_pos, _ = _logits(S, p0, p1, LOSS)
            x = lse_neg[:, None] - z_pos  # log2 e^(L - z)
            band_loss += tl.sum(tl.where(pos, _softplus2(x), 0.0), axis=1)
            band_weight += tl.sum(tl.where(pos, 1.0 / (1.0 + tl.exp2(-x)), 0.0), axis=1)
    n_neg = NB - n_same
    loss, f, off_pos, off_neg, extra = _anchor_loss(lse_neg, lse_pos, n_pos, n_neg, sum_pos, band_loss,
                                                    band_weight, p0, LOSS)
    input_row = tl.load(a_perm_ptr + rows, mask=row_ok, other=0)
    tl.store(loss_ptr + input_row, loss, mask=row_ok)
    tl.store(stats_ptr + rows, f, mask=row_ok)
    tl.store(stats_ptr + NA + rows, off_pos, mask=row_ok)
    tl.store(stats_ptr + 2 * NA + rows, off_neg, mask=row_ok)
    tl.store(stats_ptr + 3 * NA + rows, extra, mask=row_ok)
    tl.store(counts_ptr + rows, n_pos, mask=row_ok)
    tl.store(counts_ptr + NA + rows, n_neg, mask=row_ok)


@triton.jit
def _saved(f_ptr, stats_ptr, idx, ok, NA):
    """An anchor's saved factors: f (upstream gradient included), off_pos, off_neg, extra."""
    return (tl.load(f_ptr + idx, mask=ok, other=0.0), tl.load(stats_ptr + NA + idx, mask=ok, other=0.0),
            tl.load(stats_ptr + 2 * NA + idx, mask=ok, other=0.0), tl.load(stats_ptr + 3 * NA + idx, mask=ok, other=0.0))


@triton.jit(do_not_specialize=["NA", "NB", "n_anchors", "cols_per_split"])
def pair_backward_kernel(a_ptr, a_perm_ptr, inv_a_ptr, norm_a_ptr, ya_ptr, ref_self_index_rows_ptr,
                         b_ptr, b_perm_ptr, inv_b_ptr, yb_ptr, ref_self_index_cols_ptr,
                         f_ptr, stats_ptr, g_scale_ptr, out_ptr, part_ptr, x_dot_dx_part_ptr,
                         NA, NB, n_anchors, D_vecs, stride_a_vecs, stride_b_vecs, stride_out_vecs, cols_per_split,
                         p0, p1, norm_eps,
                         LOSS: tl.constexpr, ANCHOR_ROWS: tl.constexpr, ANCHOR_COLS: tl.constexpr,
                         REF_SELF_INDEX_MODE: tl.constexpr, NORMALIZE: tl.constexpr, DOT_F32: tl.constexpr,
                         SCALE_WEIGHTS: tl.constexpr, SPLIT: tl.constexpr, RESIDENT: tl.constexpr,
                         ALIGN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_DOUT: tl.constexpr):
    """dA for BLOCK_N sorted rows of A, output columns [pid(2) * BLOCK_DOUT, +BLOCK_DOUT), over the columns of
    one split, as ms_kernels.backward_kernel: dA_hat_i = sum_j W_ij b_hat_j with W = G (ANCHOR_ROWS), G^T
    (ANCHOR_COLS) or G + G^T (self mode). The anchors' factors are f_ptr (f times the upstream gradient) and
    stats_ptr's rows (n_anchors anchors). A tile without one of the rows' labels and inside the split holds
    negatives only: its weights need no compare."""
    D, stride_a, stride_b = D_vecs * ALIGN, stride_a_vecs * ALIGN, stride_b_vecs * ALIGN
    stride_out = stride_out_vecs * ALIGN
    row0 = tl.program_id(0) * BLOCK_N
    split = tl.program_id(1)
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < NA
    douts = tl.program_id(2) * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    dout_ok = douts < D
    inv_a = tl.load(inv_a_ptr + rows, mask=row_ok, other=1.0)
    ya = tl.load(ya_ptr + rows, mask=row_ok, other=-1)
    a_off, a_ok, a_res = _anchor_block(a_ptr, a_perm_ptr, row0, NA, D, stride_a, BLOCK_N, BLOCK_D, DOT_F32, RESIDENT)
    if REF_SELF_INDEX_MODE == REF_SELF_INDEX_OF_ROWS:
        ref_self_index_rows = tl.load(ref_self_index_rows_ptr + rows, mask=row_ok, other=-1)
    else:
        ref_self_index_rows = rows
    if ANCHOR_ROWS:
        f_r, off_pos_r, off_neg_r, extra_r = _saved(f_ptr, stats_ptr, rows, row_ok, n_anchors)
    y_lo = tl.min(tl.where(row_ok & (ya >= 0), ya, 2147483647))
    y_hi = tl.max(tl.where(row_ok, ya, -1))
    acc = tl.zeros([BLOCK_N, BLOCK_DOUT], dtype=tl.float32)
    x_dot_dx = tl.zeros([BLOCK_N], dtype=tl.float32)
    c0 = split * cols_per_split
    c1 = tl.minimum(c0 + cols_per_split, NB)
    for start in range(c0, c1, BLOCK_M):
        cols, col_ok, b_off, inv_b, yb, S, b_res = _column_tile(
            a_ptr, a_off, a_ok, a_res, a_off, a_ok, a_res, inv_a, b_ptr, b_perm_ptr, inv_b_ptr, yb_ptr,
            stride_b, start, c1, D, BLOCK_N, BLOCK_M, BLOCK_D, 1, NORMALIZE, DOT_F32, RESIDENT)
        if ANCHOR_COLS:
            f_c, off_pos_c, off_neg_c, extra_c = _saved(f_ptr, stats_ptr, cols, col_ok, n_anchors)
        masked = (tl.sum(((yb >= y_lo) & (yb <= y_hi)).to(tl.int32)) > 0) | (start + BLOCK_M > c1)
        if masked:
            valid = row_ok[:, None] & col_ok[None, :]
            if REF_SELF_INDEX_MODE == REF_SELF_INDEX_OF_COLS:
                ref_self_index_cols = tl.load(ref_self_index_cols_ptr + cols, mask=col_ok, other=-1)
            else:
                ref_self_index_cols = cols
            pos, neg = _pair_masks(ya, yb, rows, cols, ref_self_index_rows, ref_self_index_cols, valid, True,
                                   REF_SELF_INDEX_MODE)
            W = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            if ANCHOR_ROWS:
                W += _pair_weights(S, pos, neg, f_r[:, None], off_pos_r[:, None], off_neg_r[:, None],
                                   extra_r[:, None], p0, p1, LOSS)
            if ANCHOR_COLS:
                W += _pair_weights(S, pos, neg, f_c[None, :], off_pos_c[None, :], off_neg_c[None, :],
                                   extra_c[None, :], p0, p1, LOSS)
        else:
            W = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            if ANCHOR_ROWS:
                W += _negative_weights(S, f_r[:, None], off_neg_r[:, None], extra_r[:, None], p0, p1, LOSS)
            if ANCHOR_COLS:
                W += _negative_weights(S, f_c[None, :], off_neg_c[None, :], extra_c[None, :], p0, p1, LOSS)
        acc, x_dot_dx = _accumulate(acc, x_dot_dx, W, S, b_ptr, b_off, inv_b, col_ok, douts, dout_ok, b_res,
                                    NORMALIZE, DOT_F32, SCALE_WEIGHTS, RESIDENT)
    if SPLIT:
        part = (split * NA + rows).to(tl.int64)
        tl.store(part_ptr + part[:, None] * D + douts[None, :], acc, mask=row_ok[:, None] & dout_ok[None, :])
        if tl.program_id(2) == 0:
            tl.store(x_dot_dx_part_ptr + part, x_dot_dx, mask=row_ok)
    else:
        _finish_rows(acc, x_dot_dx, a_ptr, a_off, rows, row_ok, inv_a, norm_a_ptr, a_perm_ptr, douts, dout_ok,
                     g_scale_ptr, out_ptr, stride_out, norm_eps, NORMALIZE)
