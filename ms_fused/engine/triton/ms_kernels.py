"""Triton kernels of the `triton` backend (docs/semantics.md, "Similarities" to "Gradient"); the launchers,
the label sort and the configurations are in backend.py.

Order. Anchors (rows) and reference rows (columns) are visited in label order through permutations:
row r of a kernel is input row `perm[r]`. Labels are dense int32 numbers, sorted, so the positives of a
block of consecutive anchors lie in one band of columns [band_lo, band_hi) (`band_lo`/`band_hi` hold each
row's own range; a block's band runs from its first row's lo to its last row's hi). Tiles outside the band
hold negatives only, and skip the label compares.

Similarities. Every S tile is built from dots of one shape, (BLOCK_N rows) x (BLOCK_M columns), accumulated
in float32 over BLOCK_D-wide K steps in increasing order, then multiplied by (inv_a * inv_b) when
normalising: the same rounding in every kernel, so the forward and the backward mine the same pairs. The
launchers run every kernel of one loss with one tile shape and without floating-point contraction.

Bytes. With RESIDENT, BLOCK_D covers all of D in one K step: a program loads its anchor block once and
keeps it while the column tiles stream past, and loads each column tile once; the backward then uses that
one column tile for both the S recompute and W @ b_hat. The sweep stacks ROW_GROUPS anchor blocks on each
column tile (one dot per block, the tiles joined), so a column tile serves ROW_GROUPS * BLOCK_N anchors.
Without RESIDENT (D too wide for the target's shared memory), anchor and column K-chunks are re-read per
tile.

Alignment. Triton knows of an integer argument only whether it is a multiple of 16, so D = 100, D = 130 or a
column slice of a wider tensor would leave every row load at one element (2 bytes) and the column tiles without
asynchronous copies. The launchers therefore pass D and the row strides in vectors of ALIGN elements (the `*_vecs`
arguments, backend.load_align) and each kernel multiplies them back by the constexpr ALIGN: the compiler
then knows that every row starts at a multiple of ALIGN elements and that the K mask (ks < D) changes only at such
multiples, so row loads move ALIGN elements (up to 16 bytes) at a time and the pipeliner copies column tiles with
cp.async. The loaded values, and so every S, are the same whatever ALIGN is.

Exponentials are in base 2: with alpha2 = alpha * log2(e), exp(-alpha (S - base)) = exp2(-alpha2 (S - base)).
Saved log-sum-exps (A, B of the gradient equations) are in base 2 as well (A2 = A * log2(e)); an anchor whose
row touches a NaN/Inf is saved with A2 = B2 = NaN, the flag of the statistics layout (ms_fused/engine/_autograd.py).

Forward: band_min_kernel (min_pos over the band), sweep_kernel (max_neg and the hard-negative sum over all
columns, the sum NaN for a row whose S holds a NaN or Inf, split across programs when there are few anchor blocks), finish_kernel (combines the splits, then
the hard-positive sum over the band, the loss). With COUNT_PAIRS, sweep_kernel also counts each anchor's
hard negatives per split and finish_kernel adds them up and counts the hard positives (int32 per anchor);
without it, nothing is counted. Backward: backward_kernel (one S recompute per tile, the
weights G, the whole-D accumulator) and, for split columns, combine_grad_kernel.
"""
import triton
import triton.language as tl

INF = tl.constexpr(float("inf"))

# which (anchor, column) pair is the anchor's own copy, removed from the positives
REF_SELF_INDEX_NONE = tl.constexpr(0)      # reference mode without own copies
REF_SELF_INDEX_DIAGONAL = tl.constexpr(1)  # self mode: the diagonal
# reference mode, rows are anchors: ref_self_index_rows[r] is the row's own column
REF_SELF_INDEX_OF_ROWS = tl.constexpr(2)
# reference mode, columns are anchors (the dR pass): ref_self_index_cols[c] is its own row
REF_SELF_INDEX_OF_COLS = tl.constexpr(3)


@triton.jit(do_not_specialize=["n_rows"])
def row_stats_kernel(x_ptr, norm_ptr, inv_ptr, bad_ptr, n_rows, D_vecs, stride_n_vecs, norm_eps,
                     ALIGN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """norm = ||x_i||, inv = 1 / max(norm, eps) (F.normalize's clamp), bad = the row holds a NaN or Inf."""
    D, stride_n = D_vecs * ALIGN, stride_n_vecs * ALIGN
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    row_base = x_ptr + rows.to(tl.int64)[:, None] * stride_n
    sum_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    n_bad = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k in range(0, D, BLOCK_D):
        ks = k + tl.arange(0, BLOCK_D)
        x = tl.load(row_base + ks[None, :], mask=row_ok[:, None] & (ks < D)[None, :], other=0.0).to(tl.float32)
        sum_sq += tl.sum(x * x, axis=1)
        n_bad += tl.sum(((tl.abs(x) == INF) | (x != x)).to(tl.int32), axis=1)
    norm = tl.sqrt_rn(sum_sq)
    tl.store(norm_ptr + rows, norm, mask=row_ok)
    tl.store(inv_ptr + rows, tl.div_rn(tl.full([BLOCK_N], 1.0, tl.float32), tl.maximum(norm, norm_eps)), mask=row_ok)
    tl.store(bad_ptr + rows, (n_bad > 0).to(tl.int8), mask=row_ok)


@triton.jit
def _whole_rows(ptr, off, ok, D, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr):
    """(rows, BLOCK_D) tile of whole rows (BLOCK_D >= D), upcast to float32 for DOT_F32 dots."""
    ks = tl.arange(0, BLOCK_D)
    t = tl.load(ptr + off[:, None] + ks[None, :], mask=ok[:, None] & (ks < D)[None, :], other=0.0)
    if DOT_F32:
        t = t.to(tl.float32)
    return t


@triton.jit
def _dot_rows(a_ptr, a_off, a_ok, a_res, b_ptr, b_off, b_ok, b_res, D,
              BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
              DOT_F32: tl.constexpr, RESIDENT: tl.constexpr):
    """(BLOCK_N, BLOCK_M) float32 tile of <a, b>: RESIDENT takes the loaded whole rows a_res, b_res (one K
    step), else K-chunks are loaded here."""
    if RESIDENT:
        b = b_res
        if DOT_F32:
            b = b.to(tl.float32)
        acc = tl.dot(a_res, tl.trans(b), input_precision="ieee")
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k in range(0, D, BLOCK_D):
            ks = k + tl.arange(0, BLOCK_D)
            k_ok = ks < D
            a = tl.load(a_ptr + a_off[:, None] + ks[None, :], mask=a_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptr + b_off[None, :] + ks[:, None], mask=k_ok[:, None] & b_ok[None, :], other=0.0)
            if DOT_F32:  # float32 inputs, and the interpreter (half operands upcast exactly)
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _similarities(a_ptr, a0_off, a0_ok, a0_res, a1_off, a1_ok, a1_res, inv_a, b_ptr, b_off, b_ok, b_res, inv_b, D,
                  BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ROW_GROUPS: tl.constexpr,
                  NORMALIZE: tl.constexpr, DOT_F32: tl.constexpr, RESIDENT: tl.constexpr):
    """(ROW_GROUPS * BLOCK_N, BLOCK_M) float32 tile of <a_hat, b_hat>: one (BLOCK_N, BLOCK_M) dot per anchor
    block (a0, then a1 when ROW_GROUPS == 2), stacked in row order."""
    acc = _dot_rows(a_ptr, a0_off, a0_ok, a0_res, b_ptr, b_off, b_ok, b_res, D, BLOCK_N, BLOCK_M, BLOCK_D,
                    DOT_F32, RESIDENT)
    if ROW_GROUPS == 2:
        acc1 = _dot_rows(a_ptr, a1_off, a1_ok, a1_res, b_ptr, b_off, b_ok, b_res, D, BLOCK_N, BLOCK_M, BLOCK_D,
                         DOT_F32, RESIDENT)
        acc = tl.reshape(tl.permute(tl.join(acc, acc1), (2, 0, 1)), (2 * BLOCK_N, BLOCK_M))
    if NORMALIZE:
        # one product inv_a * inv_b (commutative), so S_ij and S_ji round alike
        acc = acc * (inv_a[:, None] * inv_b[None, :])
    return acc


@triton.jit
def _rows(perm_ptr, inv_ptr, y_ptr, idx, ok, stride, LABELS: tl.constexpr = True):
    """Element offsets, inverse norms and labels (without LABELS: -1) of the sorted rows `idx`."""
    off = tl.load(perm_ptr + idx, mask=ok, other=0).to(tl.int64) * stride
    if LABELS:
        y = tl.load(y_ptr + idx, mask=ok, other=-1)
    else:
        y = idx * 0 - 1
    return off, tl.load(inv_ptr + idx, mask=ok, other=1.0), y


@triton.jit
def _column_tile(a_ptr, a0_off, a0_ok, a0_res, a1_off, a1_ok, a1_res, inv_a, b_ptr, b_perm_ptr, inv_b_ptr, yb_ptr,
                 stride_b, start, end, D,
                 BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ROW_GROUPS: tl.constexpr,
                 NORMALIZE: tl.constexpr, DOT_F32: tl.constexpr, RESIDENT: tl.constexpr,
                 MASK_COLS: tl.constexpr = True, LABELS: tl.constexpr = True):
    """Sorted columns [start, start + BLOCK_M) below `end`: their indices, in-range mask, element offsets,
    inverse norms and labels, the rows' S tile against them, and (RESIDENT) the whole column rows loaded
    for it (else 0). Without MASK_COLS the tile is whole (start + BLOCK_M <= end): no column is masked and
    the labels are not loaded (-1); without LABELS they are not loaded either (the caller loads them where
    it needs them)."""
    cols = start + tl.arange(0, BLOCK_M)
    col_ok = cols < end
    if MASK_COLS:
        b_off, inv_b, yb = _rows(b_perm_ptr, inv_b_ptr, yb_ptr, cols, col_ok, stride_b, LABELS)
        b_ok = col_ok
    else:
        b_off = tl.load(b_perm_ptr + cols).to(tl.int64) * stride_b
        inv_b = tl.load(inv_b_ptr + cols)
        yb = cols * 0 - 1
        b_ok = cols >= 0
    if RESIDENT:
        b_res = _whole_rows(b_ptr, b_off, b_ok, D, BLOCK_D, False)
    else:
        b_res = 0
    S = _similarities(a_ptr, a0_off, a0_ok, a0_res, a1_off, a1_ok, a1_res, inv_a, b_ptr, b_off, b_ok, b_res, inv_b,
                      D, BLOCK_N, BLOCK_M, BLOCK_D, ROW_GROUPS, NORMALIZE, DOT_F32, RESIDENT)
    return cols, col_ok, b_off, inv_b, yb, S, b_res


@triton.jit
def _anchor_block(a_ptr, a_perm_ptr, row0, NA, D, stride_a, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_F32: tl.constexpr, RESIDENT: tl.constexpr):
    """Element offsets and in-range mask of the BLOCK_N sorted anchors from row0, and (RESIDENT) their whole
    rows, loaded once for the program (else 0)."""
    rows = row0 + tl.arange(0, BLOCK_N)
    ok = rows < NA
    off = tl.load(a_perm_ptr + rows, mask=ok, other=0).to(tl.int64) * stride_a
    if RESIDENT:
        res = _whole_rows(a_ptr, off, ok, D, BLOCK_D, DOT_F32)
    else:
        res = 0
    return off, ok, res


@triton.jit
def _band(band_lo_ptr, band_hi_ptr, row0, NA, BLOCK_N: tl.constexpr):
    """Columns [lo, hi) that hold every positive of rows row0 .. row0 + BLOCK_N - 1 (labels are sorted)."""
    last = tl.minimum(row0 + BLOCK_N, NA) - 1
    return tl.load(band_lo_ptr + row0), tl.load(band_hi_ptr + last)


@triton.jit
def _pair_masks(ya, yb, rows, cols, ref_self_index_rows, ref_self_index_cols, valid, in_band,
                REF_SELF_INDEX_MODE: tl.constexpr):
    """docs/semantics.md "Pair sets": pos = same label minus the anchor's own copy, neg = other label.
    Outside the band every valid pair is a negative; the label compares are skipped there."""
    if in_band:
        same = ya[:, None] == yb[None, :]
        neg = valid & (ya[:, None] != yb[None, :])
        if REF_SELF_INDEX_MODE == REF_SELF_INDEX_DIAGONAL:
            pos = valid & same & (rows[:, None] != cols[None, :])
        elif REF_SELF_INDEX_MODE == REF_SELF_INDEX_OF_ROWS:
            pos = valid & same & (ref_self_index_rows[:, None] != cols[None, :])
        elif REF_SELF_INDEX_MODE == REF_SELF_INDEX_OF_COLS:
            pos = valid & same & (rows[:, None] != ref_self_index_cols[None, :])
        else:
            pos = valid & same
    else:
        neg = valid
        pos = valid & False
    return pos, neg


@triton.jit
def _add_exp2(shift, total, z, keep, S, FLAG_NON_FINITE: tl.constexpr):
    """Online log-sum-exp in base 2: with total = sum 2^(z_seen - shift), add the kept entries of z per row,
    raising the shift to the running maximum (it never falls below its start, 0). FLAG_NON_FINITE: the total
    turns NaN once any S of the row is NaN or +-Inf, kept or not (docs/semantics.md "Non-finite inputs"):
    S * 0 is 0 for a finite S and NaN otherwise, and a sum propagates NaN on every target (a GPU's max.f32
    would drop it)."""
    new_shift = tl.maximum(shift, tl.max(tl.where(keep, z, -INF), axis=1))
    terms = tl.exp2(tl.where(keep, z - new_shift[:, None], -INF))
    if FLAG_NON_FINITE:
        terms = terms + S * 0.0
    return new_shift, total * tl.exp2(shift - new_shift) + tl.sum(terms, axis=1)


@triton.jit(do_not_specialize=["M", "NA", "n_groups", "search_steps", "group_rows"])
def ref_codes_kernel(yr_ptr, ya_sorted_ptr, code_sorted_ptr, perm_ptr, code_ptr, group_ptr, count_ptr,
                     M, NA, n_groups, search_steps, group_rows, BLOCK: tl.constexpr):
    """Reference mode's label order, computed here instead of sorting the reference rows: for each reference
    row j (kept in its own order, perm[j] = j), p = the first sorted anchor with its label (binary search in
    the anchors' sorted labels); code[j] = that anchor's dense code, group[j] = p // group_rows, or -2 / -1
    when no anchor has the label. count[g, block] = the block's rows of group g."""
    blk = tl.program_id(0)
    j = blk * BLOCK + tl.arange(0, BLOCK)
    ok = j < M
    y = tl.load(yr_ptr + j, mask=ok, other=0)
    lo = tl.zeros([BLOCK], dtype=tl.int32)
    hi = tl.zeros([BLOCK], dtype=tl.int32) + NA
    for _ in range(0, search_steps):  # lo = the first sorted anchor whose label is >= y
        active = lo < hi
        mid = (lo + hi) // 2
        less = tl.load(ya_sorted_ptr + mid, mask=active & ok, other=0) < y
        lo = tl.where(active & less, mid + 1, lo)
        hi = tl.where(active & ~less, mid, hi)
    found = ok & (lo < NA) & (tl.load(ya_sorted_ptr + lo, mask=ok & (lo < NA), other=0) == y)
    code = tl.where(found, tl.load(code_sorted_ptr + lo, mask=found, other=0), -2)
    group = tl.where(found, lo // group_rows, -1)
    tl.store(perm_ptr + j, j, mask=ok)
    tl.store(code_ptr + j, code, mask=ok)
    tl.store(group_ptr + j, group, mask=ok)
    for g in range(0, n_groups):
        tl.store(count_ptr + g * tl.num_programs(0) + blk, tl.sum((group == g).to(tl.int32)))


@triton.jit(do_not_specialize=["M", "n_groups"])
def band_list_kernel(group_ptr, code_ptr, inv_ptr, offset_ptr, list_ptr, list_code_ptr, list_inv_ptr,
                     M, n_groups, BLOCK: tl.constexpr):
    """The band kernels' columns in reference mode: every reference row whose label an anchor has, grouped by
    group (ref_codes_kernel) and in row order within a group, at offset[g, block] + its rank in the block;
    with its code and inverse norm beside it. The rows of a block of sorted anchors then lie in one range."""
    blk = tl.program_id(0)
    j = blk * BLOCK + tl.arange(0, BLOCK)
    ok = j < M
    group = tl.load(group_ptr + j, mask=ok, other=-1)
    code = tl.load(code_ptr + j, mask=ok, other=0)
    inv = tl.load(inv_ptr + j, mask=ok, other=1.0)
    for g in range(0, n_groups):
        member = group == g
        at = tl.load(offset_ptr + g * tl.num_programs(0) + blk) + tl.cumsum(member.to(tl.int32), 0) - 1
        tl.store(list_ptr + at, j, mask=member)
        tl.store(list_code_ptr + at, code, mask=member)
        tl.store(list_inv_ptr + at, inv, mask=member)


@triton.jit
def _band_chunk(band_lo_ptr, band_hi_ptr, row0, NA, n_band_splits, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Columns [start, end) of this program's share of its block's band: the band's tiles in n_band_splits
    consecutive runs, run program_id(1) (empty for programs past the band's last tile)."""
    lo, hi = _band(band_lo_ptr, band_hi_ptr, row0, NA, BLOCK_N)
    per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_M), n_band_splits) * BLOCK_M
    start = lo + tl.program_id(1) * per_split
    return start, tl.minimum(hi, start + per_split)


@triton.jit
def _band_rows(a_ptr, a_perm_ptr, inv_a_ptr, ya_ptr, ref_self_index_ptr, row0, NA, D, stride_a,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, RESIDENT: tl.constexpr):
    """What a band kernel holds of its anchor block: inverse norms, labels, own columns, row offsets and
    (RESIDENT) the rows themselves."""
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < NA
    a_off, a_ok, a_res = _anchor_block(a_ptr, a_perm_ptr, row0, NA, D, stride_a, BLOCK_N, BLOCK_D, DOT_F32, RESIDENT)
    return (tl.load(inv_a_ptr + rows, mask=row_ok, other=1.0), tl.load(ya_ptr + rows, mask=row_ok, other=-1),
            tl.load(ref_self_index_ptr + rows, mask=row_ok, other=-1), a_off, a_res)


@triton.jit
def _band_tile(a_ptr, a_off, a_res, inv_a, ya, rows, row_ok, ref_self_index, b_ptr, b_perm_ptr, inv_b_ptr, yb_ptr,
               stride_b, start, end, D, REF_SELF_INDEX_MODE: tl.constexpr, NORMALIZE: tl.constexpr,
               DOT_F32: tl.constexpr, RESIDENT: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """S of the block against band columns [start, start + BLOCK_M) below `end`, and its positives."""
    cols, col_ok, b_off, inv_b, yb, S, b_res = _column_tile(
        a_ptr, a_off, row_ok, a_res, a_off, row_ok, a_res, inv_a, b_ptr, b_perm_ptr, inv_b_ptr, yb_ptr,
        stride_b, start, end, D, BLOCK_N, BLOCK_M, BLOCK_D, 1, NORMALIZE, DOT_F32, RESIDENT)
    if REF_SELF_INDEX_MODE == REF_SELF_INDEX_OF_ROWS:
        # reference mode's band columns are a list of reference rows: the own copy is named by its row
        col_ids = tl.load(b_perm_ptr + cols, mask=col_ok, other=-1)
    else:
        col_ids = cols
    pos, _ = _pair_masks(ya, yb, rows, col_ids, ref_self_index, ref_self_index, row_ok[:, None] & col_ok[None, :],
                         True, REF_SELF_INDEX_MODE)
    return S, pos


@triton.jit(do_not_specialize=["NA", "NB", "n_band_splits"])
def band_min_kernel(a_ptr, a_perm_ptr, inv_a_ptr, ya_ptr, ref_self_index_ptr, band_lo_ptr, band_hi_ptr,
                    b_ptr, b_perm_ptr, inv_b_ptr, yb_ptr, min_pos_part_ptr,
                    NA, NB, D_vecs, stride_a_vecs, stride_b_vecs, n_band_splits,
                    REF_SELF_INDEX_MODE: tl.constexpr, NORMALIZE: tl.constexpr, DOT_F32: tl.constexpr,
                    RESIDENT: tl.constexpr, ALIGN: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Forward stage 1, program (anchor block, band split): min over the split's share of P_i of S_ip
    (INF when it holds none); the launcher takes the minimum over the splits once, for the sweep."""
    D, stride_a, stride_b = D_vecs * ALIGN, stride_a_vecs * ALIGN, stride_b_vecs * ALIGN
    row0 = tl.program_id(0) * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < NA
    c0, c1 = _band_chunk(band_lo_ptr, band_hi_ptr, row0, NA, n_band_splits, BLOCK_N, BLOCK_M)
    min_pos = tl.full([BLOCK_N], INF, tl.float32)
    inv_a, ya, ref_self_index, a_off, a_res = _band_rows(a_ptr, a_perm_ptr, inv_a_ptr, ya_ptr, ref_self_index_ptr,
                                                         row0, NA, D, stride_a, BLOCK_N, BLOCK_D, DOT_F32, RESIDENT)
    for start in range(c0, c1, BLOCK_M):
        S, pos = _band_tile(a_ptr, a_off, a_res, inv_a, ya, rows, row_ok, ref_self_index, b_ptr, b_perm_ptr,
                            inv_b_ptr, yb_ptr, stride_b, start, c1, D, REF_SELF_INDEX_MODE, NORMALIZE, DOT_F32,
                            RESIDENT, BLOCK_N, BLOCK_M, BLOCK_D)
        min_pos = tl.minimum(min_pos, tl.min(tl.where(pos, S, INF), axis=1))
    tl.store(min_pos_part_ptr + tl.program_id(1) * NA + rows, min_pos, mask=row_ok)


@triton.jit
def _max_of_parts(part_ptr, rows, row_ok, NA, n_parts, ROWS: tl.constexpr):
    """The maximum over n_parts partial maxima."""
    out = tl.full([ROWS], -INF, tl.float32)
    for k in range(0, n_parts):
        out = tl.maximum(out, tl.load(part_ptr + k * NA + rows, mask=row_ok, other=-INF))
    return out


@triton.jit
def _log1p_sum_of_parts(shift_ptr, sum_ptr, count_ptr, rows, row_ok, NA, n_parts,
                        COUNT_PAIRS: tl.constexpr, ROWS: tl.constexpr):
    """log2(1 + sum) of partial sums (part k: sum_k = sum 2^(z - shift_k)) added in part order (deterministic),
    with the "1" as 2^0; and the parts' pair counts added up (0 without COUNT_PAIRS)."""
    shift = tl.zeros([ROWS], dtype=tl.float32)
    total = tl.full([ROWS], 1.0, tl.float32)
    count = tl.zeros([ROWS], dtype=tl.int32)
    for k in range(0, n_parts):
        part = k * NA + rows
        if COUNT_PAIRS:
            count += tl.load(count_ptr + part, mask=row_ok, other=0)
        shift_k = tl.load(shift_ptr + part, mask=row_ok, other=0.0)
        new_shift = tl.maximum(shift, shift_k)
        total = (total * tl.exp2(shift - new_shift)
                 + tl.load(sum_ptr + part, mask=row_ok, other=0.0) * tl.exp2(shift_k - new_shift))
        shift = new_shift
    return shift + tl.log2(total), count


@triton.jit
def _negatives_tile(S, neg, min_pos, max_acc, sum_acc, count_acc, shift, total, beta2, base, neg_offset,
                    eps, MINING: tl.constexpr, COUNT_PAIRS: tl.constexpr, FIXED_SHIFT: tl.constexpr,
                    MASKED: tl.constexpr, ELEMENTWISE: tl.constexpr):
    """The sweep's epilogue of one S tile (docs/semantics.md "Mining", "Loss"): every pair of an unmasked tile
    is a negative (a tile outside the label band), so such a tile costs per element a max, the hard-negative
    test, one exp2 and a sum; MASKED tiles keep the negatives `neg` only.

    Element-wise accumulators (max_acc and, with FIXED_SHIFT, sum_acc; ELEMENTWISE) are reduced over the
    columns once, after the last tile; count_acc (COUNT_PAIRS) is counted per row and tile. FIXED_SHIFT: the shift of the hard-negative sum is a constant bound of
    beta2 (S - base) (the launcher's, normalised S), so each term is exp2(beta2 S + neg_offset) with
    neg_offset = -(beta2 base + shift) and no running maximum; else an online shift per row and tile.
    Non-finite S: a pair not summed adds S * 0 (0, or NaN for a NaN or Inf), a summed +Inf adds Inf, and
    loss_kernel flags either (a finite S never makes the sum Inf: its terms are at most about 1)."""
    if MASKED:
        if MINING:
            tile_max = tl.where(neg, S, -INF)
            hard = neg & (S + eps > min_pos[:, None])
        else:
            hard = neg
    else:
        if MINING:
            tile_max = S
            hard = S + eps > min_pos[:, None]
        else:
            hard = S == S
    if MINING:
        if ELEMENTWISE:
            max_acc = tl.maximum(max_acc, tile_max)
        else:
            max_acc = tl.maximum(max_acc, tl.max(tile_max, axis=1, keep_dims=True))
    if COUNT_PAIRS:  # statistics only (return_stats): counted per row and tile, in the registers of a row
        count_acc += tl.sum(hard.to(tl.int32), axis=1)
    if FIXED_SHIFT:
        terms = tl.where(hard, tl.exp2(tl.fma(S, beta2, neg_offset)), S * 0.0)
        if ELEMENTWISE:
            sum_acc += terms
        else:
            sum_acc += tl.sum(terms, axis=1, keep_dims=True)
    else:
        shift, total = _add_exp2(shift, total, (S - base) * beta2, hard, S, True)
    return max_acc, sum_acc, count_acc, shift, total


@triton.jit(do_not_specialize=["NA", "NB", "cols_per_split"])
def sweep_kernel(a_ptr, a_perm_ptr, inv_a_ptr, ya_ptr, band_lo_ptr, band_hi_ptr,
                 b_ptr, b_perm_ptr, inv_b_ptr, yb_ptr, min_pos_ptr,
                 max_neg_part_ptr, shift_part_ptr, sum_part_ptr, count_part_ptr,
                 NA, NB, D_vecs, stride_a_vecs, stride_b_vecs, cols_per_split, beta2, base, eps, fixed_shift,
                 SELF_MODE: tl.constexpr, MINING: tl.constexpr, NORMALIZE: tl.constexpr, DOT_F32: tl.constexpr,
                 COUNT_PAIRS: tl.constexpr, FIXED_SHIFT: tl.constexpr, ELEMENTWISE: tl.constexpr,
                 RESIDENT: tl.constexpr, ROW_GROUPS: tl.constexpr, ALIGN: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Forward stage 2, program (ROW_GROUPS anchor blocks, column split): over the split's columns, max_neg
    and the hard-negative sum of exp2(beta2 (S - base) - shift), shift = fixed_shift with FIXED_SHIFT, else
    online (starting at 0, so the final shift is max(0, max z)). Hard negatives: S + eps > min_pos, tested as
    written. The sum is NaN for a row whose S holds a NaN or Inf. ELEMENTWISE: the max and the sum are kept per
    element and reduced over the columns after the last tile (the launcher's choice, by registers), else reduced
    over each tile's columns.

    A tile is masked (label and bounds compares) when it overlaps the block's label band or the end of the
    split, else every pair in it is a negative and its epilogue compares nothing: one branch per tile, on
    a value uniform over the program, around the epilogue only (one copy of the tile's dots and loads: a
    second loop for the masked tiles cost the resident D = 512 sweep its registers under Triton 3.6).
    SELF_MODE: the columns are the anchors in label order and the band is the column range [lo, hi);
    reference mode's columns are in their own order, and each tile tests its label codes against the
    block's (labels are dense codes, sorted over the anchors: the block's labels are [y_first, y_last])."""
    D, stride_a, stride_b = D_vecs * ALIGN, stride_a_vecs * ALIGN, stride_b_vecs * ALIGN
    ROWS: tl.constexpr = ROW_GROUPS * BLOCK_N
    row0 = tl.program_id(0) * ROWS
    split = tl.program_id(1)
    rows = row0 + tl.arange(0, ROWS)
    row_ok = rows < NA
    inv_a = tl.load(inv_a_ptr + rows, mask=row_ok, other=1.0)
    ya = tl.load(ya_ptr + rows, mask=row_ok, other=-1)
    a0_off, a0_ok, a0_res = _anchor_block(a_ptr, a_perm_ptr, row0, NA, D, stride_a, BLOCK_N, BLOCK_D, DOT_F32,
                                          RESIDENT)
    if ROW_GROUPS == 2:
        a1_off, a1_ok, a1_res = _anchor_block(a_ptr, a_perm_ptr, row0 + BLOCK_N, NA, D, stride_a, BLOCK_N, BLOCK_D,
                                              DOT_F32, RESIDENT)
    else:
        a1_off, a1_ok, a1_res = a0_off, a0_ok, a0_res
    if MINING:
        min_pos = tl.load(min_pos_ptr + rows, mask=row_ok, other=INF)
    else:
        min_pos = inv_a
    neg_offset = -(beta2 * base + fixed_shift)
    ACC_COLS: tl.constexpr = BLOCK_M if ELEMENTWISE else 1
    max_acc = tl.full([ROWS, ACC_COLS], -INF, tl.float32)
    if FIXED_SHIFT:
        sum_acc = tl.zeros([ROWS, ACC_COLS], dtype=tl.float32)
    else:
        sum_acc = 0.0
    if COUNT_PAIRS:
        count_acc = tl.zeros([ROWS], dtype=tl.int32)
    else:
        count_acc = 0
    shift = tl.zeros([ROWS], dtype=tl.float32)
    total = tl.zeros([ROWS], dtype=tl.float32)
    c0 = split * cols_per_split
    c1 = tl.minimum(c0 + cols_per_split, NB)
    LABELS_WITH_TILE: tl.constexpr = (not SELF_MODE) or (not RESIDENT)
    if SELF_MODE:
        lo, hi = _band(band_lo_ptr, band_hi_ptr, row0, NA, ROWS)
    else:
        y_first = tl.load(ya_ptr + row0)
        y_last = tl.load(ya_ptr + tl.minimum(row0 + ROWS, NA) - 1)
    for start in range(c0, c1, BLOCK_M):
        # self mode tells a tile of negatives by the band, and loads the labels only for the masked tiles
        # (resident tiles only: elsewhere the branch's own load spilled the sweep, sm_80 at D = 130 and sm_100's
        # float32 under Triton 3.6)
        cols, col_ok, b_off, inv_b, yb, S, b_res = _column_tile(
            a_ptr, a0_off, a0_ok, a0_res, a1_off, a1_ok, a1_res, inv_a, b_ptr, b_perm_ptr, inv_b_ptr, yb_ptr,
            stride_b, start, c1, D, BLOCK_N, BLOCK_M, BLOCK_D, ROW_GROUPS, NORMALIZE, DOT_F32, RESIDENT,
            LABELS=LABELS_WITH_TILE)
        if SELF_MODE:
            masked = ((start < hi) & (start + BLOCK_M > lo)) | (start + BLOCK_M > c1)
        else:
            masked = (tl.sum(((yb >= y_first) & (yb <= y_last)).to(tl.int32)) > 0) | (start + BLOCK_M > c1)
        if masked:
            if not LABELS_WITH_TILE:
                yb = tl.load(yb_ptr + cols, mask=col_ok, other=-1)
            neg = col_ok[None, :] & (ya[:, None] != yb[None, :])
            max_acc, sum_acc, count_acc, shift, total = _negatives_tile(
                S, neg, min_pos, max_acc, sum_acc, count_acc, shift, total, beta2, base, neg_offset, eps,
                MINING, COUNT_PAIRS, FIXED_SHIFT, True, ELEMENTWISE)
        else:
            max_acc, sum_acc, count_acc, shift, total = _negatives_tile(
                S, S, min_pos, max_acc, sum_acc, count_acc, shift, total, beta2, base, neg_offset, eps,
                MINING, COUNT_PAIRS, FIXED_SHIFT, False, ELEMENTWISE)
    if FIXED_SHIFT:
        shift = shift + fixed_shift
        total = tl.sum(sum_acc, axis=1)
    part = split * NA + rows
    tl.store(max_neg_part_ptr + part, tl.max(max_acc, axis=1), mask=row_ok)
    tl.store(shift_part_ptr + part, shift, mask=row_ok)
    tl.store(sum_part_ptr + part, total, mask=row_ok)
    if COUNT_PAIRS:
        tl.store(count_part_ptr + part, count_acc, mask=row_ok)


@triton.jit(do_not_specialize=["NA", "NB", "n_splits", "n_band_splits"])
def finish_kernel(a_ptr, a_perm_ptr, inv_a_ptr, ya_ptr, ref_self_index_ptr, band_lo_ptr, band_hi_ptr,
                  b_ptr, b_perm_ptr, inv_b_ptr, yb_ptr, max_neg_part_ptr,
                  pos_shift_part_ptr, pos_sum_part_ptr, pos_count_part_ptr,
                  NA, NB, D_vecs, stride_a_vecs, stride_b_vecs, n_splits, n_band_splits, alpha2, base, eps,
                  REF_SELF_INDEX_MODE: tl.constexpr, MINING: tl.constexpr, NORMALIZE: tl.constexpr,
                  DOT_F32: tl.constexpr, COUNT_PAIRS: tl.constexpr, RESIDENT: tl.constexpr, ALIGN: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Forward stage 3, program (anchor block, band split): max_neg from the sweep's splits, then over the
    split's share of the band the sum of exp2(-alpha2 (S - base) - shift) of the hard positives
    (S - eps < max_neg) with an online shift, and (COUNT_PAIRS) their number: one partial per band split,
    which loss_kernel combines."""
    D, stride_a, stride_b = D_vecs * ALIGN, stride_a_vecs * ALIGN, stride_b_vecs * ALIGN
    row0 = tl.program_id(0) * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < NA
    shift = tl.zeros([BLOCK_N], dtype=tl.float32)
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    n_pos = tl.zeros([BLOCK_N], dtype=tl.int32)
    c0, c1 = _band_chunk(band_lo_ptr, band_hi_ptr, row0, NA, n_band_splits, BLOCK_N, BLOCK_M)
    if MINING:
        max_neg = _max_of_parts(max_neg_part_ptr, rows, row_ok, NA, n_splits, BLOCK_N)
    inv_a, ya, ref_self_index, a_off, a_res = _band_rows(a_ptr, a_perm_ptr, inv_a_ptr, ya_ptr, ref_self_index_ptr,
                                                         row0, NA, D, stride_a, BLOCK_N, BLOCK_D, DOT_F32, RESIDENT)
    for start in range(c0, c1, BLOCK_M):
        S, pos = _band_tile(a_ptr, a_off, a_res, inv_a, ya, rows, row_ok, ref_self_index, b_ptr, b_perm_ptr,
                            inv_b_ptr, yb_ptr, stride_b, start, c1, D, REF_SELF_INDEX_MODE, NORMALIZE, DOT_F32,
                            RESIDENT, BLOCK_N, BLOCK_M, BLOCK_D)
        if MINING:
            hard = pos & (S - eps < max_neg[:, None])
        else:
            hard = pos
        if COUNT_PAIRS:
            n_pos += tl.sum(hard.to(tl.int32), axis=1)
        z = (S - base) * (-alpha2)
        shift, total = _add_exp2(shift, total, z, hard, S, False)
    part = tl.program_id(1) * NA + rows
    tl.store(pos_shift_part_ptr + part, shift, mask=row_ok)
    tl.store(pos_sum_part_ptr + part, total, mask=row_ok)
    if COUNT_PAIRS:
        tl.store(pos_count_part_ptr + part, n_pos, mask=row_ok)


@triton.jit(do_not_specialize=["NA", "n_splits", "n_band_splits"])
def loss_kernel(a_perm_ptr, bad_ptr, max_neg_part_ptr, shift_part_ptr, sum_part_ptr,
                count_part_ptr, pos_shift_part_ptr, pos_sum_part_ptr, pos_count_part_ptr,
                loss_ptr, max_neg_ptr, lse_pos_ptr, lse_neg_ptr, counts_ptr,
                NA, n_splits, n_band_splits, alpha2, beta2,
                COUNT_PAIRS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Forward stage 4, one program per BLOCK_N anchors: the sweep's and the band's partials combined in
    split order (deterministic), with the "1" of log(1 + sum) as exp2(0), into the loss
    A/alpha + B/beta = A2/alpha2 + B2/beta2, NaN for a bad anchor: its input row held a NaN/Inf (`bad`) or
    its row of S did (a NaN or Inf negatives' sum, the sweep's flag). Writes the loss at the anchor's input row and saves
    max_neg, A2, B2 in sorted order, A2 = B2 = NaN for a bad anchor. With COUNT_PAIRS, counts_ptr
    gets (2, NA) int32 in sorted order: each anchor's hard positives, then its hard negatives."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < NA
    max_neg = _max_of_parts(max_neg_part_ptr, rows, row_ok, NA, n_splits, BLOCK_N)
    lse_neg, n_neg = _log1p_sum_of_parts(shift_part_ptr, sum_part_ptr, count_part_ptr, rows, row_ok, NA, n_splits,
                                         COUNT_PAIRS, BLOCK_N)
    lse_pos, n_pos = _log1p_sum_of_parts(pos_shift_part_ptr, pos_sum_part_ptr, pos_count_part_ptr, rows, row_ok, NA,
                                         n_band_splits, COUNT_PAIRS, BLOCK_N)
    bad = (tl.load(bad_ptr + rows, mask=row_ok, other=0) != 0) | (lse_neg != lse_neg) | (lse_neg == INF)
    lse_pos = tl.where(bad, float("nan"), lse_pos)
    lse_neg = tl.where(bad, float("nan"), lse_neg)
    loss = lse_pos / alpha2 + lse_neg / beta2
    input_row = tl.load(a_perm_ptr + rows, mask=row_ok, other=0)
    tl.store(loss_ptr + input_row, loss, mask=row_ok)
    tl.store(max_neg_ptr + rows, max_neg, mask=row_ok)
    tl.store(lse_pos_ptr + rows, lse_pos, mask=row_ok)
    tl.store(lse_neg_ptr + rows, lse_neg, mask=row_ok)
    if COUNT_PAIRS:
        tl.store(counts_ptr + rows, n_pos, mask=row_ok)
        tl.store(counts_ptr + NA + rows, n_neg, mask=row_ok)


@triton.jit
def _weights(S, pos, neg, g, min_pos, max_neg, lse_pos, lse_neg, alpha2, beta2, base, eps, MINING: tl.constexpr):
    """docs/semantics.md "Gradient": G = -g exp2(-alpha2 (S - base) - A2) on hard positives,
    +g exp2(beta2 (S - base) - B2) on hard negatives, 0 elsewhere (the caller makes every pair of a bad anchor
    NaN)."""
    if MINING:
        hard_pos = pos & (S - eps < max_neg)
        hard_neg = neg & (S + eps > min_pos)
    else:
        hard_pos = pos
        hard_neg = neg
    d = S - base
    z = tl.where(hard_pos, d * (-alpha2) - lse_pos, d * beta2 - lse_neg)
    return tl.exp2(tl.where(hard_pos | hard_neg, z, -INF)) * tl.where(hard_pos, -g, g)


@triton.jit
def _through_a_branch(x, always):
    """x, returned through a branch that the compiler cannot fold (`always` holds at run time). Triton 3.6 puts
    every warp of a dot whose result feeds another dot along its rows (its chained-dot rule, for attention), so
    the backward's 64-row S dot on 8 warps would be computed by both warpgroups with other instructions than
    the forward's; a result that leaves a branch hides the chain (NEGATIVE_TILES' branch does it already).
    Float32 dots run on the CUDA cores, where the rule does not apply and the branch costs registers."""
    if always:
        y = x + 0.0
    else:
        y = tl.zeros_like(x)
    return y


@triton.jit
def _anchor_stats(g_ptr, min_pos_ptr, max_neg_ptr, lse_pos_ptr, lse_neg_ptr, idx, ok):
    """What the forward saved for the sorted anchors `idx`, their upstream gradient g, and whether they are
    bad (saved A2 NaN)."""
    lse_pos = tl.load(lse_pos_ptr + idx, mask=ok, other=0.0)
    return (tl.load(g_ptr + idx, mask=ok, other=0.0), tl.load(min_pos_ptr + idx, mask=ok, other=INF),
            tl.load(max_neg_ptr + idx, mask=ok, other=-INF), lse_pos,
            tl.load(lse_neg_ptr + idx, mask=ok, other=0.0), lse_pos != lse_pos)


@triton.jit
def _negative_weights(S, g, min_pos, neg_offset, beta2, eps, MINING: tl.constexpr):
    """G of a tile whose pairs are all negatives (docs/semantics.md "Gradient"): g exp2(beta2 S + neg_offset)
    on the hard ones, neg_offset = -(beta2 base + B2). A bad anchor (B2 NaN) comes with min_pos = -Inf from
    _negative_stats: every pair hard, every weight NaN."""
    w = tl.exp2(tl.fma(S, beta2, neg_offset)) * g
    if MINING:
        w = tl.where(S + eps > min_pos, w, 0.0)
    return w


@triton.jit
def _negative_stats(min_pos, lse_neg, bad, beta2, base):
    """What _negative_weights takes of an anchor's saved statistics: min_pos (-Inf for a bad anchor) and
    neg_offset."""
    return tl.where(bad, -INF, min_pos), -(beta2 * base + lse_neg)


@triton.jit
def _shared_exp_weights(S, pos, neg, pf_r, nf_r, min_pos_r, max_neg_r, pf_c, nf_c, min_pos_c, max_neg_c,
                        alpha2, beta2, base, eps, MINING: tl.constexpr):
    """G + G^T of a self-mode tile with one exp2 per pair (SHARED_EXP): a pair is a positive for both of its
    anchors or a negative for both, so G_ij = -g_i exp2(-alpha2 (S - base) - A2_i) and G_ji share the
    exponential e = exp2(-alpha2 (S - base)) on a positive, exp2(beta2 (S - base)) on a negative, and each
    anchor adds its factor pf = g exp2(-A2) (nf = g exp2(-B2)) where the pair is hard for it."""
    d = S - base
    e = tl.exp2(tl.where(pos, d * (-alpha2), d * beta2))
    if MINING:
        lo = S - eps
        hi = S + eps
        w = (tl.where(pos & (lo < max_neg_r), -pf_r, tl.where(neg & (hi > min_pos_r), nf_r, 0.0))
             + tl.where(pos & (lo < max_neg_c), -pf_c, tl.where(neg & (hi > min_pos_c), nf_c, 0.0)))
    else:
        w = tl.where(pos, -pf_r - pf_c, tl.where(neg, nf_r + nf_c, 0.0))
    return e * w


@triton.jit
def _shared_exp_negative_weights(S, nf_r, min_pos_r, nf_c, min_pos_c, e_offset, beta2, eps, MINING: tl.constexpr):
    """_shared_exp_weights of a tile whose pairs are all negatives: e = exp2(beta2 S + e_offset), e_offset =
    -beta2 base; min_pos is -Inf for a bad anchor (_negative_stats), whose nf is NaN: every pair NaN."""
    e = tl.exp2(tl.fma(S, beta2, e_offset))
    if MINING:
        hi = S + eps
        w = tl.where(hi > min_pos_r, nf_r, 0.0) + tl.where(hi > min_pos_c, nf_c, 0.0)
    else:
        w = nf_r + nf_c
    return e * w


@triton.jit
def _accumulate(acc, x_dot_dx, W, S, b_ptr, b_off, inv_b, col_ok, douts, dout_ok, b_res,
                NORMALIZE: tl.constexpr, DOT_F32: tl.constexpr, SCALE_WEIGHTS: tl.constexpr, RESIDENT: tl.constexpr):
    """acc += W @ b_hat[cols, douts]; x_dot_dx += sum_j W_ij S_ij (= x_hat_i . dx_hat_i once all tiles are in).
    RESIDENT reuses the column rows that S was computed from (douts is all of D then).

    SCALE_WEIGHTS folds inv_b into W (W_ij inv_j b_j = W_ij b_hat_j) instead of scaling the (BLOCK_M,
    BLOCK_DOUT) b tile; float16 keeps the scaled tile, since W inv_b can pass its range."""
    if NORMALIZE:
        x_dot_dx += tl.sum(W * S, axis=1)
    if RESIDENT:
        b = b_res
    else:
        b = tl.load(b_ptr + b_off[:, None] + douts[None, :], mask=col_ok[:, None] & dout_ok[None, :], other=0.0)
    if SCALE_WEIGHTS:
        W = W * inv_b[None, :]
    else:
        b = (b.to(tl.float32) * inv_b[:, None]).to(b_ptr.dtype.element_ty)
    if DOT_F32:
        if b_ptr.dtype.element_ty != tl.float32:
            # the interpreter's float32 dot on the operands a GPU's half-precision dot takes: W rounded alike
            W = W.to(b_ptr.dtype.element_ty).to(tl.float32)
        acc = tl.dot(W, b.to(tl.float32), acc, input_precision="ieee")
    else:  # half-precision operands for the tensor cores; |W| <= 2 (2^15 in float16) after the upstream scaling
        acc = tl.dot(W.to(b_ptr.dtype.element_ty), b, acc)
    return acc, x_dot_dx


@triton.jit
def _finish_rows(acc, x_dot_dx, a_ptr, a_off, rows, row_ok, inv_a, norm_a_ptr, a_perm_ptr, douts, dout_ok,
                 g_scale_ptr, out_ptr, stride_out, norm_eps, NORMALIZE: tl.constexpr):
    """dx = (dx_hat - x_hat (x_hat . dx_hat)) / max(|x|, eps), times the upstream scale, stored at the
    input rows; rows with |x| < eps get dx_hat / eps (F.normalize clamps the norm there)."""
    if NORMALIZE:
        norm_a = tl.load(norm_a_ptr + rows, mask=row_ok, other=1.0)
        a_hat = tl.load(a_ptr + a_off[:, None] + douts[None, :],
                        mask=row_ok[:, None] & dout_ok[None, :], other=0.0).to(tl.float32) * inv_a[:, None]
        x_dot_dx = tl.where(norm_a >= norm_eps, x_dot_dx, 0.0)
        acc = (acc - a_hat * x_dot_dx[:, None]) * inv_a[:, None]
    acc = acc * tl.load(g_scale_ptr)
    input_row = tl.load(a_perm_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    tl.store(out_ptr + input_row[:, None] * stride_out + douts[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dout_ok[None, :])


@triton.jit(do_not_specialize=["NA", "NB", "cols_per_split"])
def backward_kernel(a_ptr, a_perm_ptr, inv_a_ptr, norm_a_ptr, ya_ptr, ref_self_index_rows_ptr,
                    b_ptr, b_perm_ptr, inv_b_ptr, yb_ptr, ref_self_index_cols_ptr,
                    g_ptr, g_scale_ptr, min_pos_ptr, max_neg_ptr, lse_pos_ptr, lse_neg_ptr, pos_factor_ptr, neg_factor_ptr,
                    out_ptr, part_ptr, x_dot_dx_part_ptr,
                    NA, NB, D_vecs, stride_a_vecs, stride_b_vecs, stride_out_vecs, cols_per_split,
                    alpha2, beta2, base, eps, norm_eps,
                    ANCHOR_ROWS: tl.constexpr, ANCHOR_COLS: tl.constexpr, REF_SELF_INDEX_MODE: tl.constexpr,
                    MINING: tl.constexpr, NORMALIZE: tl.constexpr, DOT_F32: tl.constexpr,
                    SCALE_WEIGHTS: tl.constexpr, SPLIT: tl.constexpr, SKIP_ZERO_TILES: tl.constexpr,
                    NEGATIVE_TILES: tl.constexpr, SHARED_EXP: tl.constexpr, RESIDENT: tl.constexpr,
                    ALIGN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DOUT: tl.constexpr):
    """dA for BLOCK_N sorted rows of A, output columns [pid(2) * BLOCK_DOUT, +BLOCK_DOUT), over the columns
    of one split: dA_hat_i = sum_j W_ij b_hat_j with W = G (ANCHOR_ROWS), G^T (ANCHOR_COLS) or G + G^T
    (self mode), each tile of S computed once. No atomics: a program owns its rows; with SPLIT the
    partial sums go to `part_ptr` and combine_grad_kernel adds them in split order.
    x_hat_i . dx_hat_i = sum_j W_ij S_ij, so the normalisation chain needs no other D-slice.
    RESIDENT: one D-slice (BLOCK_DOUT = BLOCK_D >= D); each column tile is loaded once, for S and for W @ b;
    the launcher always stores partial sums then (SPLIT), the normalisation chain needs registers.
    NEGATIVE_TILES: a tile without a same-label pair and inside the split takes _negative_weights (no label,
    self or bounds compare, one exp2 per anchor side); else every tile takes the masked weights.
    SHARED_EXP (self mode, normalised S, the launcher's bound on the exponents): one exp2 per pair for G and
    G^T together, with the anchors' factors pf = g exp2(-A2), nf = g exp2(-B2) from pos_factor / neg_factor."""
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
        g_r, min_pos_r, max_neg_r, lse_pos_r, lse_neg_r, bad_r = _anchor_stats(
            g_ptr, min_pos_ptr, max_neg_ptr, lse_pos_ptr, lse_neg_ptr, rows, row_ok)
    if SHARED_EXP:
        pf_r = tl.load(pos_factor_ptr + rows, mask=row_ok, other=0.0)
        nf_r = tl.load(neg_factor_ptr + rows, mask=row_ok, other=0.0)
        e_offset = -(beta2 * base)

    # the rows' labels [y_lo, y_hi] (other labels' codes are negative): a column tile without one of them holds
    # negatives only, in G and in G^T
    y_lo = tl.min(tl.where(row_ok & (ya >= 0), ya, 2147483647))
    y_hi = tl.max(tl.where(row_ok, ya, -1))

    acc = tl.zeros([BLOCK_N, BLOCK_DOUT], dtype=tl.float32)
    x_dot_dx = tl.zeros([BLOCK_N], dtype=tl.float32)
    c0 = split * cols_per_split
    c1 = tl.minimum(c0 + cols_per_split, NB)
    for start in range(c0, c1, BLOCK_M):
        cols, col_ok, b_off, inv_b, yb, S, b_res = _column_tile(
            a_ptr, a_off, row_ok, a_res, a_off, row_ok, a_res, inv_a, b_ptr, b_perm_ptr, inv_b_ptr, yb_ptr,
            stride_b, start, c1, D, BLOCK_N, BLOCK_M, BLOCK_D, 1, NORMALIZE, DOT_F32, RESIDENT)
        # one branch per tile, on a value uniform over the program, around the weights only
        masked = (tl.sum(((yb >= y_lo) & (yb <= y_hi)).to(tl.int32)) > 0) | (start + BLOCK_M > c1)
        if masked | (not NEGATIVE_TILES):
            valid = row_ok[:, None] & col_ok[None, :]
            if REF_SELF_INDEX_MODE == REF_SELF_INDEX_OF_COLS:
                ref_self_index_cols = tl.load(ref_self_index_cols_ptr + cols, mask=col_ok, other=-1)
            else:
                ref_self_index_cols = cols
            pos, neg = _pair_masks(ya, yb, rows, cols, ref_self_index_rows, ref_self_index_cols, valid,
                                   True, REF_SELF_INDEX_MODE)
            W = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            bad = valid & False
            if SHARED_EXP:
                _, min_pos_c, max_neg_c, _, _, bad_c = _anchor_stats(
                    g_ptr, min_pos_ptr, max_neg_ptr, lse_pos_ptr, lse_neg_ptr, cols, col_ok)
                W = _shared_exp_weights(
                    S, pos, neg, pf_r[:, None], nf_r[:, None], min_pos_r[:, None], max_neg_r[:, None],
                    tl.load(pos_factor_ptr + cols, mask=col_ok, other=0.0)[None, :],
                    tl.load(neg_factor_ptr + cols, mask=col_ok, other=0.0)[None, :], min_pos_c[None, :],
                    max_neg_c[None, :], alpha2, beta2, base, eps, MINING)
                bad = bad | bad_r[:, None] | bad_c[None, :]
            elif ANCHOR_ROWS:
                W += _weights(S, pos, neg, g_r[:, None], min_pos_r[:, None], max_neg_r[:, None], lse_pos_r[:, None],
                              lse_neg_r[:, None], alpha2, beta2, base, eps, MINING)
                bad = bad | bad_r[:, None]
            if ANCHOR_COLS and not SHARED_EXP:
                g_c, min_pos_c, max_neg_c, lse_pos_c, lse_neg_c, bad_c = _anchor_stats(
                    g_ptr, min_pos_ptr, max_neg_ptr, lse_pos_ptr, lse_neg_ptr, cols, col_ok)
                W += _weights(S, pos, neg, g_c[None, :], min_pos_c[None, :], max_neg_c[None, :], lse_pos_c[None, :],
                              lse_neg_c[None, :], alpha2, beta2, base, eps, MINING)
                bad = bad | bad_c[None, :]
            # NaN on every pair of a bad anchor (docs/semantics.md "Non-finite inputs")
            W = tl.where(valid & bad, float("nan"), W)
            if not NEGATIVE_TILES and not DOT_F32:
                W = _through_a_branch(W, start < c1)
        elif SHARED_EXP:
            _, min_pos_c, _, _, _, bad_c = _anchor_stats(g_ptr, min_pos_ptr, max_neg_ptr, lse_pos_ptr, lse_neg_ptr,
                                                         cols, col_ok)
            W = _shared_exp_negative_weights(
                S, nf_r[:, None], tl.where(bad_r, -INF, min_pos_r)[:, None],
                tl.load(neg_factor_ptr + cols, mask=col_ok, other=0.0)[None, :],
                tl.where(bad_c, -INF, min_pos_c)[None, :], e_offset, beta2, eps, MINING)
        else:
            if ANCHOR_ROWS:
                min_pos_neg_r, neg_offset_r = _negative_stats(min_pos_r, lse_neg_r, bad_r, beta2, base)
            if ANCHOR_COLS:
                g_c, min_pos_c, _, _, lse_neg_c, bad_c = _anchor_stats(
                    g_ptr, min_pos_ptr, max_neg_ptr, lse_pos_ptr, lse_neg_ptr, cols, col_ok)
                min_pos_neg_c, neg_offset_c = _negative_stats(min_pos_c, lse_neg_c, bad_c, beta2, base)
                W = _negative_weights(S, g_c[None, :], min_pos_neg_c[None, :], neg_offset_c[None, :], beta2, eps,
                                      MINING)
                if ANCHOR_ROWS:
                    W += _negative_weights(S, g_r[:, None], min_pos_neg_r[:, None], neg_offset_r[:, None], beta2,
                                           eps, MINING)
            else:
                W = _negative_weights(S, g_r[:, None], min_pos_neg_r[:, None], neg_offset_r[:, None], beta2, eps,
                                      MINING)
        if SKIP_ZERO_TILES:
            # a tile without mined pairs adds nothing: its second product is skipped (NaN != 0 is kept)
            if tl.sum((W != 0).to(tl.int32)) > 0:
                acc, x_dot_dx = _accumulate(acc, x_dot_dx, W, S, b_ptr, b_off, inv_b, col_ok, douts, dout_ok, b_res,
                                            NORMALIZE, DOT_F32, SCALE_WEIGHTS, RESIDENT)
        else:
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


@triton.jit(do_not_specialize=["NA", "n_splits"])
def combine_grad_kernel(a_ptr, a_perm_ptr, inv_a_ptr, norm_a_ptr, g_scale_ptr, part_ptr, x_dot_dx_part_ptr,
                        out_ptr, NA, D_vecs, stride_a_vecs, stride_out_vecs, n_splits, norm_eps,
                        NORMALIZE: tl.constexpr, ALIGN: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_DOUT: tl.constexpr):
    """The split partial sums of backward_kernel added in split order, then the normalisation chain."""
    D, stride_a, stride_out = D_vecs * ALIGN, stride_a_vecs * ALIGN, stride_out_vecs * ALIGN
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < NA
    douts = tl.program_id(1) * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    dout_ok = douts < D
    acc = tl.zeros([BLOCK_N, BLOCK_DOUT], dtype=tl.float32)
    x_dot_dx = tl.zeros([BLOCK_N], dtype=tl.float32)
    for split in range(0, n_splits):
        part = (split * NA + rows).to(tl.int64)
        acc += tl.load(part_ptr + part[:, None] * D + douts[None, :], mask=row_ok[:, None] & dout_ok[None, :],
                       other=0.0)
        x_dot_dx += tl.load(x_dot_dx_part_ptr + part, mask=row_ok, other=0.0)
    a_off = tl.load(a_perm_ptr + rows, mask=row_ok, other=0).to(tl.int64) * stride_a
    inv_a = tl.load(inv_a_ptr + rows, mask=row_ok, other=1.0)
    _finish_rows(acc, x_dot_dx, a_ptr, a_off, rows, row_ok, inv_a, norm_a_ptr, a_perm_ptr, douts, dout_ok,
                 g_scale_ptr, out_ptr, stride_out, norm_eps, NORMALIZE)
