r"""The B×B aligned costs of equivariant OT on the host, compiled by numba.

Same quantity as the vectorised :func:`zoo.losses.equivariant.aligned_cost_matrix`: for every
noise/data pair the particle permutation π minimising $\sum_a \|x_{0,π(a)} - x_{1,a}\|^2$
(the same optimum as the vectorised Hungarian search; exact ties, which continuous data do not
produce, may be broken differently), then the aligned cost
$\|x_0\|^2 + \|x_1\|^2 - 2\max_{R \in SO(d)} \mathrm{tr}(R H)$ with $H = (π x_0)^\top x_1$.

Why a second implementation: the vectorised search runs every one of the B² problems for the
worst case's number of steps (n(n+1)/2 Dijkstra steps for n particles), while a scalar search
stops as soon as a free column is reached — about a third of the steps on LJ13 — and touches
only a few hundred bytes per problem. Rows of the batch are spread over the CPU cores.

The rotation term uses Horn's quaternion form: $\max_R \mathrm{tr}(R H)$ is the largest
eigenvalue of a symmetric traceless 4×4 matrix built from H; it is found by Newton's method on
its characteristic polynomial from an upper bound, which converges monotonically from above
(all roots real). In 2-D it is $\sqrt{(h_{11} + h_{22})^2 + (h_{12} - h_{21})^2}$.

Everything runs in float64.
"""

from __future__ import annotations

import threading

import numba
import numpy as np

_LOCK = threading.Lock()  # numba's default threading layer takes one parallel launch at a time


@numba.njit(cache=True, nogil=True)
def _assign(cost, cheapest_row, u, v, shortest, path, col_of_row, row_of_col, remaining, in_tree, perm):
    """Shortest augmenting paths on one n×n cost matrix; ``perm[j]`` = row paired with column j.

    ``cheapest_row[j]``: the first row of column j's minimum (:func:`_column_minima`, or found
    while the costs are written). After a column reduction and an augmenting row reduction,
    the rows left unassigned enter one at a time; a Dijkstra search over reduced costs
    ``cost[i, j] - u[i] - v[j]`` from the entering row visits only the columns not yet reached
    (kept packed in ``remaining``) and stops at the first free column; the potentials are then
    corrected by the path lengths and the path is flipped.
    """
    n = cost.shape[0]
    u[:] = 0.0
    col_of_row[:] = -1
    row_of_col[:] = -1
    # Column reduction: v[j] = min_i cost[i, j] keeps every reduced cost ≥ 0; a row that is the
    # cheapest of a column and still free takes it at reduced cost 0. Only the rows left over
    # need a search (about a third of them on random problems).
    for j in range(n):
        best_i = cheapest_row[j]
        v[j] = cost[best_i, j]
        if col_of_row[best_i] < 0:
            col_of_row[best_i] = j
            row_of_col[j] = best_i
    # Augmenting row reduction (Jonker–Volgenant): a free row takes its cheapest column
    # (reduced by v), lowering that column's v by the gap to its second cheapest so that it is
    # tight for this row and no cheaper for any other; the previous owner becomes free and
    # goes next. v only decreases, so every reduced cost stays ≥ 0. Two passes, a bounded
    # number of moves each; rows still free go to the search below.
    free = remaining
    n_free = 0
    for i in range(n):
        if col_of_row[i] < 0:
            free[n_free] = i
            n_free += 1
    for _ in range(2):
        if n_free == 0:
            break
        k = 0
        n_left = 0
        moves = 0
        while k < n_free and moves < 4 * n:
            moves += 1
            i = free[k]
            k += 1
            # The cheapest and second cheapest column (the first of equals), in two passes of
            # selects rather than one pass of nested branches, which random costs mispredict.
            first, j1 = np.inf, 0
            for j in range(n):
                h = cost[i, j] - v[j]
                better = h < first
                first = h if better else first
                j1 = j if better else j1
            second, j2 = np.inf, 0
            for j in range(n):
                h = cost[i, j] - v[j]
                better = (h < second) and (j != j1)
                second = h if better else second
                j2 = j if better else j2
            owner = row_of_col[j1]
            if first < second:
                v[j1] -= second - first
            elif owner >= 0:  # a tie: take the second column instead, leaving v as it is
                j1 = j2
                owner = row_of_col[j2]
            row_of_col[j1] = i
            col_of_row[i] = j1
            if owner >= 0:
                col_of_row[owner] = -1
                if first < second:
                    k -= 1
                    free[k] = owner
                else:
                    path[n_left] = owner
                    n_left += 1
        for m in range(k, n_free):  # rows not reached within the move budget stay free
            path[n_left] = free[m]
            n_left += 1
        for m in range(n_left):
            free[m] = path[m]
        n_free = n_left
    for i in range(n):
        j = col_of_row[i]
        u[i] = cost[i, j] - v[j] if j >= 0 else 0.0
    for entering in range(n):
        if col_of_row[entering] >= 0:
            continue
        for k in range(n):
            remaining[k] = k
        n_remaining = n
        shortest[:] = np.inf
        in_tree[:] = False
        dist = 0.0
        i = entering
        sink = -1
        while sink < 0:
            in_tree[i] = True
            ui = u[i]
            best = np.inf
            best_k = 0
            for k in range(n_remaining):
                j = remaining[k]
                r = dist + cost[i, j] - ui - v[j]
                if r < shortest[j]:
                    shortest[j] = r
                    path[j] = i
                if shortest[j] < best:
                    best = shortest[j]
                    best_k = k
            dist = best
            j = remaining[best_k]
            n_remaining -= 1
            remaining[best_k] = remaining[n_remaining]
            remaining[n_remaining] = j  # the reached columns collect at the end
            if row_of_col[j] < 0:
                sink = j
            else:
                i = row_of_col[j]
        # Potentials: reached rows and columns move by how much shorter than the sink they are.
        u[entering] += dist
        for r in range(n):
            if in_tree[r] and r != entering:
                u[r] += dist - shortest[col_of_row[r]]
        for k in range(n_remaining, n):
            j = remaining[k]
            v[j] -= dist - shortest[j]
        j = sink
        while True:
            r = path[j]
            row_of_col[j] = r
            j, col_of_row[r] = col_of_row[r], j
            if r == entering:
                break
    for j in range(n):
        perm[j] = row_of_col[j]


@numba.njit(cache=True, nogil=True)
def _max_rotation_trace_3d(h, bound, work):
    r"""$\max_{R \in SO(3)} \mathrm{tr}(R H)$: the largest eigenvalue of Horn's matrix, by Newton from ``bound``.

    ``work``: scratch of shape (2, 4, 4).
    """
    sxx, sxy, sxz = h[0, 0], h[0, 1], h[0, 2]
    syx, syy, syz = h[1, 0], h[1, 1], h[1, 2]
    szx, szy, szz = h[2, 0], h[2, 1], h[2, 2]
    k, k2 = work[0], work[1]
    k[0, 0], k[0, 1], k[0, 2], k[0, 3] = sxx + syy + szz, syz - szy, szx - sxz, sxy - syx
    k[1, 1], k[1, 2], k[1, 3] = sxx - syy - szz, sxy + syx, szx + sxz
    k[2, 2], k[2, 3] = -sxx + syy - szz, syz + szy
    k[3, 3] = -sxx - syy + szz
    for a in range(4):
        for b in range(a):
            k[a, b] = k[b, a]
    # Characteristic polynomial det(λ − K) = λ⁴ + c2 λ² + c1 λ + c0 by Faddeev–LeVerrier (tr K = 0,
    # so c3 = 0): c2 = −tr K²/2, c1 = −tr K³/3, c0 = −(tr K⁴ + c2 tr K²)/4.
    for a in range(4):
        for b in range(4):
            acc = 0.0
            for c in range(4):
                acc += k[a, c] * k[c, b]
            k2[a, b] = acc
    t2, t3, t4 = 0.0, 0.0, 0.0
    for a in range(4):
        for b in range(4):
            t2 += k[a, b] * k[b, a]
            t3 += k[a, b] * k2[b, a]
            t4 += k2[a, b] * k2[b, a]
    c2 = -0.5 * t2
    c1 = -t3 / 3.0
    c0 = -(t4 + c2 * t2) / 4.0
    lam = bound
    for _ in range(100):
        lam2 = lam * lam
        f = lam2 * lam2 + c2 * lam2 + c1 * lam + c0
        df = 4.0 * lam2 * lam + 2.0 * c2 * lam + c1
        if df <= 0.0:
            break
        step = f / df
        lam -= step
        if abs(step) <= 1e-13 * (abs(lam) + 1e-30):
            break
    return lam


@numba.njit(cache=True, nogil=True)
def _column_minima(cost, cheapest_row):
    """``cheapest_row[j]`` = the first row of column j's minimum."""
    n = cost.shape[0]
    for j in range(n):
        best_i = 0
        for i in range(1, n):
            if cost[i, j] < cost[best_i, j]:
                best_i = i
        cheapest_row[j] = best_i


@numba.njit(cache=True, nogil=True)
def _pair(a, b, types, has_types, pc, scratch, index_scratch, in_tree, perm, h, work):
    """Permutation (into ``perm``) and aligned cost of noise ``a`` onto data ``b`` ((n, d) each).

    ``scratch``: (4, n) floats; ``index_scratch``: (5, n) integers.
    """
    n, d = a.shape
    column_min, cheapest_row = scratch[3], index_scratch[4]
    for j in range(n):
        column_min[j] = np.inf
        cheapest_row[j] = 0  # stays so for a column of NaN, as in _column_minima
    for i in range(n):
        for j in range(n):
            if d == 3:  # unrolled: the loop over k costs as much as the arithmetic
                d0, d1, d2 = a[i, 0] - b[j, 0], a[i, 1] - b[j, 1], a[i, 2] - b[j, 2]
                s = d0 * d0 + d1 * d1 + d2 * d2
            else:
                s = 0.0
                for k in range(d):
                    diff = a[i, k] - b[j, k]
                    s += diff * diff
            pc[i, j] = s
            # The column reduction's minima, found while the costs are written (first of equals).
            better = s < column_min[j]
            column_min[j] = s if better else column_min[j]
            cheapest_row[j] = i if better else cheapest_row[j]
    if has_types:
        largest = 0.0
        for j in range(n):
            for i in range(n):
                largest = max(largest, pc[i, j])
        penalty = n * largest + 1.0  # larger than any type-respecting total: never chosen
        for i in range(n):
            for j in range(n):
                if types[i] != types[j]:
                    pc[i, j] += penalty
        _column_minima(pc, cheapest_row)
    _assign(pc, cheapest_row, scratch[0], scratch[1], scratch[2], index_scratch[0], index_scratch[1], index_scratch[2], index_scratch[3], in_tree, perm)
    norms = 0.0
    for j in range(n):
        for k in range(d):
            norms += a[j, k] * a[j, k] + b[j, k] * b[j, k]
    if d == 3:  # nine running sums in registers rather than in h
        h00 = h01 = h02 = h10 = h11 = h12 = h20 = h21 = h22 = 0.0
        for j in range(n):
            p = perm[j]
            a0, a1, a2, b0, b1, b2 = a[p, 0], a[p, 1], a[p, 2], b[j, 0], b[j, 1], b[j, 2]
            h00 += a0 * b0
            h01 += a0 * b1
            h02 += a0 * b2
            h10 += a1 * b0
            h11 += a1 * b1
            h12 += a1 * b2
            h20 += a2 * b0
            h21 += a2 * b1
            h22 += a2 * b2
        h[0, 0], h[0, 1], h[0, 2] = h00, h01, h02
        h[1, 0], h[1, 1], h[1, 2] = h10, h11, h12
        h[2, 0], h[2, 1], h[2, 2] = h20, h21, h22
    else:
        h[:] = 0.0
        for j in range(n):
            for k in range(d):
                for m in range(d):
                    h[k, m] += a[perm[j], k] * b[j, m]
    if d == 2:
        trace = np.sqrt((h[0, 0] + h[1, 1]) ** 2 + (h[0, 1] - h[1, 0]) ** 2)
    else:
        frobenius = 0.0
        for k in range(3):
            for m in range(3):
                frobenius += h[k, m] * h[k, m]
        # Both bound σ₁ + σ₂ + σ₃ from above; the second is usually within 10 %.
        trace = _max_rotation_trace_3d(h, min(0.5 * norms, np.sqrt(3.0 * frobenius)), work)
    return max(norms - 2.0 * trace, 0.0)


@numba.njit(cache=True, parallel=True)
def _cost_matrix(x0, x1, types, has_types, cost, perms):
    b0, n = x0.shape[0], x0.shape[1]
    b1 = x1.shape[0]
    for i in numba.prange(b0):
        pc = np.empty((n, n))
        scratch = np.empty((4, n))
        index_scratch = np.empty((5, n), np.int64)
        in_tree = np.empty(n, np.bool_)
        perm = np.empty(n, np.int64)
        h = np.empty((x0.shape[2], x0.shape[2]))
        work = np.empty((2, 4, 4))
        for j in range(b1):
            cost[i, j] = _pair(x0[i], x1[j], types, has_types, pc, scratch, index_scratch, in_tree, perm, h, work)
            perms[i, j, :] = perm


def aligned_cost_matrix_host(x0: np.ndarray, x1: np.ndarray, atom_types=None) -> tuple[np.ndarray, np.ndarray]:
    """Costs (b0, b1) and permutations (b0, b1, n) of particle arrays x0 (b0, n, d), x1 (b1, n, d)."""
    x0 = np.ascontiguousarray(x0, np.float64)
    x1 = np.ascontiguousarray(x1, np.float64)
    if x0.ndim != 3 or x1.shape[1:] != x0.shape[1:] or x0.shape[2] not in (2, 3):
        raise ValueError(f"need particle arrays (b, n, d) with d in (2, 3), got {x0.shape} and {x1.shape}")
    n = x0.shape[1]
    has_types = atom_types is not None
    types = np.asarray(atom_types if has_types else np.zeros(n), np.int64)
    cost = np.empty((x0.shape[0], x1.shape[0]))
    perms = np.empty((x0.shape[0], x1.shape[0], n), np.int32)
    with _LOCK:
        _cost_matrix(x0, x1, types, has_types, cost, perms)
    return cost, perms
