"""Pieces of one step against closed forms: the spectral-norm lower bound (power
iteration), the RMS clip, and the exploration noise as each leaf kind uses it.

The float64 re-derivation (`test_numpy_step.py`) runs without noise and with the exact
spectral norm, so it cannot see these pieces: each is pinned here on its own.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wkron_eqx as wk
from wkron_eqx._norms import spectral_norm_lower_bound
from wkron_eqx._transform import rms_clip_scale

from .numpy_reference import ReferenceOptimizer


# The quick subset `tools/mutations.py` runs against each mutant.
pytestmark = pytest.mark.fast


# ---------------------------------------------------------------------------------------
# spectral_norm_lower_bound


def _with_spectrum(n: int, top, bulk: float, skew: bool, seed: int, count: int) -> jax.Array:
    """`count` random float32 `n x n` matrices whose largest singular values are `top` and
    whose others are uniform in `[0, bulk]`: symmetric PSD (eigenvalues), or
    skew-symmetric (the singular values in `+-` pairs, as the Procrustes step's `R`)."""
    rng = np.random.default_rng(seed)
    size = n // 2 if skew else n
    values = np.concatenate(
        [np.broadcast_to(top, (count, len(top))), bulk * rng.random((count, size - len(top)))],
        axis=1,
    )
    if skew:
        core = np.zeros((count, n, n))
        core[:, np.arange(0, n, 2), np.arange(1, n, 2)] = values
        core[:, np.arange(1, n, 2), np.arange(0, n, 2)] = -values
    else:
        core = values[:, :, None] * np.eye(n)
    # (the basis from XLA's QR: NumPy's threads fight XLA's for the two cores)
    basis, _ = jnp.linalg.qr(jnp.asarray(rng.standard_normal((count, n, n)), jnp.float32))
    core = jnp.asarray(core, jnp.float32)
    return basis @ core @ jnp.swapaxes(basis, 1, 2)


# Close top singular values (within 4e-4 of each other, which no number of steps
# separates, and which the tolerance below accepts), then a gap to a bulk whose weight in
# the start vector each step shrinks by at least 0.6.
_TOP = (1.0, 0.9998, 0.9996)
_BULK = 0.6
_RTOL = 1e-3


@functools.cache
def _bounds(iters: int | None):
    if iters is None:  # the default number of steps
        return jax.jit(jax.vmap(spectral_norm_lower_bound))
    return jax.jit(jax.vmap(lambda M: spectral_norm_lower_bound(M, iters)))


def _relative_errors(n: int, skew: bool, iters: int | None) -> np.ndarray:
    # ||M||_2 = 1 by construction, up to float32 rounding (~1e-6).
    matrices = _with_spectrum(n, _TOP, _BULK, skew, seed=n + skew, count=6)
    return 1 - np.asarray(_bounds(iters)(matrices), np.float64)


@pytest.mark.parametrize("skew", [False, True], ids=["psd", "skew"])
@pytest.mark.parametrize("n", [48, 64])
def test_spectral_norm_bound_reaches_the_top_of_the_spectrum(n, skew):
    # With the default number of steps, the bound is within 1e-3 of ||M||_2 and never
    # above it (beyond float32 rounding).
    errors = _relative_errors(n, skew, None)
    assert np.all(errors > -1e-5), errors
    assert np.all(errors < _RTOL), errors
    # These matrices need the steps: two are not enough for any of them.
    assert np.all(_relative_errors(n, skew, 2) > _RTOL)


def test_spectral_norm_bound_of_zero_and_of_rank_one():
    assert float(spectral_norm_lower_bound(jnp.zeros((5, 5)))) == 0.0
    u = jnp.arange(1.0, 7.0)
    np.testing.assert_allclose(
        float(spectral_norm_lower_bound(jnp.outer(u, u))), float(u @ u), rtol=1e-6
    )


def test_spectral_norm_bound_of_a_large_finite_matrix():
    # Entries ~1e20: finite in float32, and so is ||M||_2; only M's squares overflow.
    M = np.diag(np.linspace(1.0, 0.1, 8)).astype(np.float32) * np.float32(1e20)
    np.testing.assert_allclose(float(spectral_norm_lower_bound(jnp.asarray(M))), 1e20, rtol=1e-3)


def _hadamard(n: int) -> np.ndarray:
    H = np.ones((1, 1))
    while H.shape[0] < n:
        H = np.block([[H, H], [H, -H]])
    return H


@pytest.mark.parametrize("kind", ["identity", "hadamard"])
def test_spectral_norm_bound_of_a_large_flat_spectrum(kind):
    # Every singular value equal: each step shrinks the iterate by 1/sqrt(n), and the
    # squares of its entries would leave float32's range (a norm of 0, and a bound ~2^65
    # too large) unless the norms are taken of rescaled vectors.
    n, c = (4096 if kind == "identity" else 2048), 3.0
    M = np.eye(n) if kind == "identity" else _hadamard(n) / np.sqrt(n)  # orthogonal
    bound = float(spectral_norm_lower_bound(jnp.asarray(c * M, jnp.float32)))
    np.testing.assert_allclose(bound, c, rtol=1e-3)


def test_step_with_a_large_finite_statistic_follows_the_float64_derivation():
    # Two steps at gradient scale 3e8 (A ~ 1e18), then one at 4e9 (A ~ 1e20: finite, but
    # its squares are not). The float64 re-derivation takes all three steps.
    grad = np.random.default_rng(1).standard_normal((12, 5)).astype(np.float32)
    tx = wk.scale_by_quad(b1=0.0, dtype=jnp.float32, noise_scale=0.0, block_size=16)
    reference = ReferenceOptimizer("quad", [(12, 5)], b1=0.0, block_size=16)
    update, state = jax.jit(tx.update), tx.init({"w": jnp.zeros((12, 5))})
    for scale in (3e8, 3e8, 4e9):
        g = grad * np.float32(scale)
        updates, state = update({"w": jnp.asarray(g)}, state)
        (expected,) = reference.step([g])
    assert int(state.skipped_steps) == 0
    entry = reference.leaves[0].entries[0]
    # The package's L is a 10-step power-iteration lower bound of the exact norm used
    # by the re-derivation: 1.1% below it here (0 before the overflow was fixed).
    assert entry.Ll * 0.97 <= float(state.dense[0].Ll[0]) <= entry.Ll * (1 + 1e-5)
    # The slightly low bound makes a slightly longer factor step: the update follows the
    # exact one in direction and size (it was far off while the bound came out 0).
    got = np.asarray(updates["w"], np.float64).ravel()
    want = np.asarray(expected, np.float64).ravel()
    assert got @ want / (np.linalg.norm(got) * np.linalg.norm(want)) > 0.998
    assert abs(np.linalg.norm(got) / np.linalg.norm(want) - 1) < 0.05


# ---------------------------------------------------------------------------------------
# rms_clip_scale: `u <- u * 1.1 / max(rms(u), 1.1)`


@pytest.mark.parametrize("rms", [0.0, 0.5, 1.0, 1.05, 1.09])
def test_rms_up_to_the_clip_is_unchanged(rms):
    size = 1000
    scale = rms_clip_scale(jnp.float32(rms * rms * size), size)
    assert float(scale) == 1.0


@pytest.mark.parametrize("rms", [1.1, 1.2, 2.0, 1e6])
def test_rms_above_the_clip_is_scaled_to_the_clip(rms):
    size = 1000
    u = np.full(size, rms, np.float32)
    scale = float(rms_clip_scale(jnp.sum(jnp.square(jnp.asarray(u))), size))
    assert scale <= 1.0
    np.testing.assert_allclose(np.sqrt(np.mean((u * scale) ** 2)), 1.1, rtol=1e-6)
    if rms > 1.1:
        np.testing.assert_allclose(scale, 1.1 / rms, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# exploration noise on 1-D leaves

_LENGTH = 4096
_NOISE = 1.0


@functools.cache
def _noisy_one_d(rule: str):
    """`(init state, jitted update)` for a vector and a scanned stack of two vectors."""
    tx = getattr(wk, f"scale_by_{rule}")(
        b1=0.0,
        dtype=jnp.float32,
        noise_scale=_NOISE,
        scanned_layers={"stack": True, "v": False},
    )
    params = {"stack": jnp.zeros((2, _LENGTH)), "v": jnp.zeros(_LENGTH)}
    return tx.init(params), jax.jit(tx.update)


def _recovered_statistic(rule: str, count: int) -> np.ndarray:
    """One step on a zero gradient from fresh factors (`q = 1`, `L = 0`) at step
    `t = count + 1`; returns `A = (noise)^2` recovered from the new factors, one row per
    layer (the two of the stack, then the vector's).

    With `g = 0`, `Pg` is the noise alone, `L = max(A) + 1` and the diagonal factor step
    gives `q' = (1 - z(A - 1))^2` with `z = lr / (2L)` (QUAD) or `q' = 1 - z(A - 1)` with
    `z = lr / L` (Procrustes), so `A = 1 + (1 - sqrt(q')) / z` or `1 + (1 - q') / z`.
    """
    state, update = _noisy_one_d(rule)
    state = state._replace(count=jnp.asarray(count, jnp.int32))
    zero = {"stack": jnp.zeros((2, _LENGTH)), "v": jnp.zeros(_LENGTH)}
    updates, state = update(zero, state)
    assert int(state.skipped_steps) == 0
    for u in jax.tree.leaves(updates):  # the output uses the noise-free gradient
        np.testing.assert_array_equal(np.asarray(u), 0.0)
    t = count + 1
    lr = max(0.7 / np.sqrt(1 + t / 10000), 0.4)
    rows = []
    for leaf in state.leaf_states():  # the params' order: "stack", then "v"
        q = np.asarray(leaf.Ql, np.float64)
        L = np.asarray(leaf.Ll, np.float64)[:, None]
        if rule == "quad":
            A = 1 + (1 - np.sqrt(q)) / (lr / (2 * L))
        else:
            A = 1 + (1 - q) / (lr / L)
        # the Lipschitz estimate of each layer is its own max(A) + 1
        np.testing.assert_allclose(np.max(A, axis=1, keepdims=True) + 1, L, rtol=1e-4)
        rows.extend(A)
    return np.stack(rows)


@pytest.mark.parametrize("rule", ["quad", "skew"])
def test_one_d_factors_see_gaussian_noise_of_the_given_scale(rule):
    A = _recovered_statistic(rule, count=0)
    eps_squared = A / _NOISE**2
    for row in eps_squared:
        # chi-squared with one degree of freedom: mean 1 (std of the mean over 4096
        # draws: 0.022), median 0.455
        assert abs(np.mean(row) - 1) < 0.1, np.mean(row)
        assert abs(np.mean(row < 0.4549) - 0.5) < 0.05
    # each layer of the stack draws its own noise
    assert abs(np.corrcoef(eps_squared[0], eps_squared[1])[0, 1]) < 0.1


def test_one_d_noise_changes_with_the_step():
    first = _recovered_statistic("quad", count=0)
    second = _recovered_statistic("quad", count=1)
    for a, b in zip(first, second, strict=True):
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.1


# ---------------------------------------------------------------------------------------
# exploration noise on dense tiles and large strips


def _quad_statistic(Q: np.ndarray, L: float, c: float, lr: float) -> np.ndarray:
    """`A` from a QUAD factor after one step from `Q = I` (its factor step, `z = lr / (2L)`).

    Diagonal: `q' = (1 - z(A - c))^2`. Dense: `Q' = M I M` with the symmetric positive
    `M = (1 + zc) I - z A`, so `M = sqrt(Q')` (by eigendecomposition).
    """
    z = lr / (2 * L)
    if Q.ndim == 1:
        return c + (1 - np.sqrt(Q)) / z
    values, vectors = np.linalg.eigh(Q)
    M = (vectors * np.sqrt(np.maximum(values, 0))) @ vectors.T
    return ((1 + z * c) * np.eye(len(Q)) - M) / z


def test_dense_and_large_factors_see_the_noise():
    # A zero gradient with unit noise: `Pg` is the noise `N` itself, so each entry's two
    # statistics are `N N^T` and `N^T N` (row / column sums of `N^2` on a diagonal side).
    # Without noise both would be 0 and the factors multiples of the identity.
    tx = wk.scale_by_quad(
        b1=0.0, dtype=jnp.float32, noise_scale=1.0, block_size=64, max_size_dense=48
    )
    params = {"dense": jnp.zeros((48, 24)), "large": jnp.zeros((60, 6))}
    _, state = jax.jit(tx.update)(params, tx.init(params))
    lr = max(0.7 / np.sqrt(1 + 1 / 10000), 0.4)
    (bucket,) = state.dense
    large = state.leaf_states()[1]
    assert large.kind == wk.LARGE_PATH and large.diag_left and not large.diag_right
    entries = [  # (Ql, Qr, Ll, Lr, rows, cols)
        (bucket.Ql[0], bucket.Qr[0], bucket.Ll[0], bucket.Lr[0], 48, 24),
        (large.Ql[0], large.Qr[0], large.Ll[0], large.Lr[0], 60, 6),
    ]
    for Ql, Qr, Ll, Lr, rows, cols in entries:
        Ql, Qr = np.asarray(Ql, np.float64), np.asarray(Qr, np.float64)
        Ql = Ql[:rows] if Ql.ndim == 1 else Ql[:rows, :rows]
        Qr = Qr[:cols, :cols]
        A_left = _quad_statistic(Ql, float(Ll), cols, lr)
        A_right = _quad_statistic(Qr, float(Lr), rows, lr)
        # Both traces are ||N||_F^2: equal, and about rows * cols (a chi-squared with
        # rows * cols degrees of freedom: relative std below 0.06 here).
        total = np.trace(A_right)
        left_total = np.sum(A_left) if A_left.ndim == 1 else np.trace(A_left)
        np.testing.assert_allclose(left_total, total, rtol=1e-3)
        assert abs(total / (rows * cols) - 1) < 0.25, total
        # The dense statistic is a Gram matrix of a `rows x cols` draw: of rank
        # min(rows, cols), so the left one of the 48 x 24 tile has 24 zero eigenvalues
        # (the others, of a Wishart matrix, are above 3 here).
        if A_left.ndim == 2:
            eigenvalues = np.linalg.eigvalsh(A_left)
            assert np.all(np.abs(eigenvalues[:24]) < 1e-3 * eigenvalues[-1])
            assert np.all(eigenvalues[24:] > 1e-2 * eigenvalues[-1])


# ---------------------------------------------------------------------------------------
# the Procrustes rotation


def _nearly_symmetric(n: int, skew_norm: float, seed: int) -> np.ndarray:
    """`I` + a small symmetric part + a skew part of spectral norm `skew_norm` (its other
    singular values at most half of it)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    values = np.concatenate([[skew_norm], skew_norm * 0.5 * rng.random(n // 2 - 1)])
    core = np.zeros((n, n))
    core[np.arange(0, n, 2), np.arange(1, n, 2)] = values
    core[np.arange(1, n, 2), np.arange(0, n, 2)] = -values
    symmetric = 0.1 * rng.standard_normal((n, n))
    return np.eye(n) + (symmetric + symmetric.T) / 2 + basis @ core @ basis.T


@pytest.mark.parametrize("skew_norm, bounded", [(0.5, True), (0.05, False)])
def test_procrustes_rotation_matches_the_float64_derivation(skew_norm, bounded):
    # With a large skew part the step is the bound `(1/8) / ||R||_2`; with a small one,
    # the shortened step `-tr(RQ) / tr(R^2 Q)`. Training keeps factors nearly symmetric,
    # so only the second shows in the step-level tests.
    from wkron_eqx._rules.procrustes import procrustes_step

    from .numpy_reference import procrustes_step as float64_step

    Q = _nearly_symmetric(16, skew_norm, seed=0).astype(np.float32)
    Q64 = Q.astype(np.float64)
    R = (Q64.T - Q64) / np.max(np.abs(Q64.T - Q64))
    bound = (1 / 8) / np.linalg.norm(R, 2)
    shortened = -np.trace(R @ Q64) / np.trace(R @ R @ Q64)
    assert (bound < shortened) == bounded
    expected = float64_step(Q64)
    ours = np.asarray(jax.jit(procrustes_step)(jnp.asarray(Q)), np.float64)
    moved = np.max(np.abs(expected - Q64))
    assert moved > 1e-2
    assert np.max(np.abs(ours - expected)) < 1e-4 * moved
    # it rotates toward symmetric: the skew part shrinks
    assert np.linalg.norm(ours - ours.T) < np.linalg.norm(Q64 - Q64.T)


# ---------------------------------------------------------------------------------------
# the QUAD step keeps a factor symmetric bit for bit


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quad_dense_step_is_symmetric_bit_for_bit(dtype):
    # QUAD applies a factor as `Q Q` instead of `Q^T Q` (`Quad.symmetric`): exact only if
    # its step returns a factor equal to its transpose bit for bit, which `M Q M` alone
    # is not in floating point.
    from wkron_eqx._rules import Quad

    rng = np.random.default_rng(0)
    G = rng.standard_normal((24, 24))
    Q = jnp.asarray(np.eye(24) + 0.05 * (G + G.T), dtype)
    X = rng.standard_normal((24, 40))
    A = jnp.asarray(X @ X.T, dtype)
    new = np.asarray(
        jax.jit(Quad().dense)(Q, A, jnp.asarray(40.0, dtype), jnp.asarray(1e-3, dtype)),
        np.float32,
    )
    assert not np.allclose(new, np.asarray(Q, np.float32))
    np.testing.assert_array_equal(new, new.T)
