"""Our `scale_by_quad` / `scale_by_skew` against the float64 NumPy re-derivation of one
step (`numpy_reference.py`), over several steps, on every leaf kind.

Tolerances. Ours runs in float32 (`dtype=jnp.float32`, `noise_scale=0`), the reference in
float64, so updates, factors and Lipschitz estimates agree to float32 rounding amplified by a
few steps: `TOL`, relative to each array's max-abs (observed: below 6e-6).

The one *algorithmic* difference is the Lipschitz statistic of a dense factor: ours bounds
`||A||_2` from below by power iteration, the reference takes the exact norm. Power iteration
converges like `(lambda_2 / lambda_1)^k`, so the tight comparisons use "spiked" gradients (a
fixed rank-1 direction per layer plus 3% noise) whose every tile has a dominant eigenvalue.
That dominance fades as the preconditioner whitens the gradient (by the 4th step some
estimates are 3e-5 low, up to 5e-4 for narrow edge tiles), hence `STEPS = 3`. Gaussian
gradients give tiles whose top eigenvalues are close; there the bound is up to ~10% low, each
step `lr / L` correspondingly longer, and the updates drift from the exact-norm derivation by
a few percent (observed: 2.3% here, 4% with 8-wide tiles), which is `GENERIC_TOL`;
`test_generic_gradients` checks that the bound is a lower bound and the updates stay within
it. (Replacing the exact norm by the same power iteration in float64
brings the Gaussian case down to 1e-6: the bound is the whole difference.)
"""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

import wkron_eqx as wk

from .helpers import cosine, run_steps
from .numpy_reference import ReferenceOptimizer, merge_shape


# The quick subset `tools/mutations.py` runs against each mutant.
pytestmark = pytest.mark.fast


TOL = 2e-5
GENERIC_TOL = 5e-2
STEPS = 3

_SCALE_BY = {"quad": wk.scale_by_quad, "skew": wk.scale_by_skew}


@functools.cache
def _transform(rule: str, **config):
    """One transform per configuration, so that cases sharing one reuse its compile."""
    return _SCALE_BY[rule](dtype=jnp.float32, noise_scale=0.0, **config)


def _spiked(rng: np.random.Generator, shape, scanned: bool):
    """A gradient sampler for `shape`: a fixed rank-1 direction per layer (in the merged 2-D
    view) times a random scale, plus small noise, so every entry's statistic has a dominant
    eigenvalue."""
    batch, layer = (shape[0], shape[1:]) if scanned else (1, shape)
    merged = merge_shape(tuple(layer))
    rows, cols = merged if len(merged) == 2 else (merged[0], 1)
    u = rng.standard_normal((batch, rows, 1))
    v = rng.standard_normal((batch, 1, cols))

    def sample():
        scale = 1 + 0.3 * rng.standard_normal((batch, 1, 1))
        g = scale * u * v + 0.03 * rng.standard_normal((batch, rows, cols))
        return g.reshape(shape).astype(np.float32)

    return sample


def _gaussian(rng: np.random.Generator, shape, scanned: bool):
    del scanned
    return lambda: rng.standard_normal(shape).astype(np.float32)


def _rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    scale = max(np.max(np.abs(ref), initial=0.0), 1e-30)
    return float(np.max(np.abs(ours - ref), initial=0.0) / scale)


def _factor(Q, valid: int, diagonal: bool) -> np.ndarray:
    Q = np.asarray(Q, np.float64)
    return Q[:valid] if diagonal else Q[:valid, :valid]


def _our_entries(state: wk.WhiteKronState, leaf_index: int):
    """The factors of a leaf's entries in our state, as `(Ql, Qr, Ll, Lr)` cut to their valid
    sizes. For a dense leaf: every real tile of every bucket, that is of all dense leaves."""
    leaf = state.leaf_states()[leaf_index]
    entries = []
    if leaf.kind == wk.DENSE_PATH:
        for bucket in state.dense:
            for i in range(bucket.valid_count):
                r, c = int(bucket.valid_rows[i]), int(bucket.valid_cols[i])
                entries.append(
                    (
                        _factor(bucket.Ql[i], r, False),
                        _factor(bucket.Qr[i], c, False),
                        float(bucket.Ll[i]),
                        float(bucket.Lr[i]),
                    )
                )
    elif leaf.kind == wk.LARGE_PATH:
        for i in range(leaf.stack):
            r, c = int(leaf.valid_rows[i]), int(leaf.valid_cols[i])
            if r == 0:  # a pipeline dummy
                continue
            entries.append(
                (
                    _factor(leaf.Ql[i], r, leaf.diag_left),
                    _factor(leaf.Qr[i], c, leaf.diag_right),
                    float(leaf.Ll[i]),
                    float(leaf.Lr[i]),
                )
            )
    else:
        for i in range(leaf.B):
            entries.append((np.asarray(leaf.Ql[i], np.float64), None, float(leaf.Ll[i]), None))
    return entries


def _entry_error(ours, ref_entry) -> float:
    Ql, Qr, _, _ = ours
    if Ql.shape != ref_entry.Ql.shape:
        return np.inf
    if Qr is None or ref_entry.Qr is None:
        return _rel(Ql, ref_entry.Ql) if Qr is None and ref_entry.Qr is None else np.inf
    if Qr.shape != ref_entry.Qr.shape:
        return np.inf
    return max(_rel(Ql, ref_entry.Ql), _rel(Qr, ref_entry.Qr))


def _match_entries(state, ref: ReferenceOptimizer, leaf_indices):
    """Match every reference entry to one of ours (the closest of the same valid sizes) and
    require the matching to be a bijection; return the `(ours, reference)` pairs.

    Matching, rather than indexing, keeps this test independent of how tiles are ordered in
    the buckets. Dense tiles of all leaves share buckets, so they are matched together.
    """
    dense = [i for i in leaf_indices if ref.leaves[i].kind == "dense"]
    groups = [dense] if dense else []
    groups += [[i] for i in leaf_indices if ref.leaves[i].kind != "dense"]
    pairs = []
    for group in groups:
        ours = _our_entries(state, group[0])
        refs = [e for i in group for e in ref.leaves[i].entries]
        assert len(ours) == len(refs)
        errors = np.array([[_entry_error(o, e) for o in ours] for e in refs])
        best = np.argmin(errors, axis=1)
        assert sorted(best.tolist()) == list(range(len(ours))), "factors do not match 1:1"
        pairs.extend((ours[b], e) for b, e in zip(best, refs, strict=True))
    return pairs


def _run(rule, leaves, sampler, *, steps=STEPS, count=0, adjust=None, seed=0, **config):
    """Run ours and the reference side by side for `steps` steps from `count`.

    **Arguments:**

    - `leaves`: `(shape, scanned)` per params leaf.
    - `sampler`: `_spiked` or `_gaussian`.
    - `adjust`: applied to both fresh states, `adjust(our_state, reference)`.

    **Returns:**

    `(worst update error, matched entry pairs)`; `_run.cosine` keeps the lowest cosine
    similarity of an update with its reference.
    """
    shapes = [s for s, _ in leaves]
    scanned = tuple(f for _, f in leaves)
    rng = np.random.default_rng(seed)
    samplers = [sampler(rng, s, f) for s, f in leaves]
    scanned_config = {"scanned_layers": scanned} if any(scanned) else {}
    tx = _transform(rule, **scanned_config, **config)
    params = tuple(jnp.zeros(s, jnp.float32) for s in shapes)
    state = tx.init(params)
    state = state._replace(count=jnp.asarray(count, jnp.int32))
    ref = ReferenceOptimizer(rule, shapes, list(scanned), count=count, **config)
    if adjust is not None:
        state = adjust(state, ref)
    grads = [[sample() for sample in samplers] for _ in range(steps)]
    updates, states = run_steps(
        tx, params, [tuple(jnp.asarray(g) for g in step) for step in grads], state=state
    )
    worst, _run.cosine = 0.0, 1.0
    for step_grads, step_updates in zip(grads, updates, strict=True):
        expected = ref.step(step_grads)
        for u, e in zip(step_updates, expected, strict=True):
            assert u.shape == e.shape and u.dtype == jnp.float32
            worst = max(worst, _rel(u, e))
            if np.any(e):
                _run.cosine = min(_run.cosine, cosine(u, e))
    state = states[-1]
    assert int(state.count) == count + steps
    return worst, _match_entries(state, ref, range(len(shapes)))


def _factor_errors(pairs) -> tuple[float, float]:
    """Worst relative error of the factors and of the Lipschitz estimates."""
    factor = max(_entry_error(o, e) for o, e in pairs)
    lipschitz = 0.0
    for (_, _, Ll, Lr), e in pairs:
        lipschitz = max(lipschitz, abs(Ll - e.Ll) / e.Ll)
        if Lr is not None:
            lipschitz = max(lipschitz, abs(Lr - e.Lr) / e.Lr)
    return factor, lipschitz


# Every leaf kind in one tree, so one compile per rule covers them all. With `block_size=16`
# and `max_size_dense=32`:
MIXED_LEAVES = (
    ((5, 7), False),  # dense, smaller than a tile
    ((29, 21), False),  # dense, 2 x 2 tiles of 16 and 13 rows by 16 and 5 cols
    ((3, 3, 4, 8), False),  # conv kernel, merged to 9 x 32: two tiles
    ((4, 6, 10), False),  # 3-D, merged to 24 x 10: two tiles
    ((3, 20, 12), True),  # a scanned stack of three 20 x 12 layers
    ((40, 20), False),  # large: diagonal left, dense strips of 16 and 4 columns
    ((10, 40), False),  # large: diagonal right, one dense strip of 10 rows
    ((36, 40), False),  # large: both sides diagonal
    ((2, 40, 10), True),  # a scanned stack of large leaves
    ((13,), False),  # 1-D
    ((), False),  # 0-d
    ((1, 9), False),  # merged to 1-D
    ((40,), False),  # 1-D, longer than max_size_dense
)
MIXED_CONFIG = dict(block_size=16, max_size_dense=32, b1=0.9)
RULES = ("quad", "skew")


@pytest.mark.parametrize("rule", RULES)
def test_every_kind(rule):
    worst_update, pairs = _run(rule, MIXED_LEAVES, _spiked, **MIXED_CONFIG)
    worst_factor, worst_lipschitz = _factor_errors(pairs)
    # dense tiles: 1 + 4 + 2 + 2 + 3 * 2; large: 2 + 1 + 1 + 2; 1-D: 4
    assert len(pairs) == 15 + 6 + 4
    assert worst_update < TOL
    assert worst_factor < TOL
    assert worst_lipschitz < TOL


@pytest.mark.parametrize("rule", RULES)
def test_options(rule):
    # No momentum (the raw gradient), per-leaf normalisation, no Adam-style division, and
    # `preconditioner_lr=0.3`, below 0.4: the step size stays 0.3 (the floor is min(lr, 0.4)).
    leaves = (((20, 12), False), ((40, 6), False), ((7,), False), ((), False))
    config = dict(
        block_size=16,
        max_size_dense=32,
        b1=0.0,
        normalize_grads=True,
        lr_style=None,
        preconditioner_lr=0.3,
    )
    worst_update, pairs = _run(rule, leaves, _spiked, **config)
    worst_factor, worst_lipschitz = _factor_errors(pairs)
    assert max(worst_update, worst_factor, worst_lipschitz) < TOL


def _unbalance(state: wk.WhiteKronState, ref: ReferenceOptimizer) -> wk.WhiteKronState:
    """Scale every left factor by 2 and every right one by 1/2, in both states."""
    for leaf in ref.leaves:
        for entry in leaf.entries:
            if entry.Qr is not None:
                entry.Ql, entry.Qr = 2 * entry.Ql, 0.5 * entry.Qr

    def scale(s):
        if s.Qr is None:  # 1-D leaves have no pair to balance
            return s
        return s.replace(Ql=2 * s.Ql, Qr=0.5 * s.Qr)

    return state._replace(
        dense=tuple(scale(d) for d in state.dense),
        large=tuple(scale(s) for s in state.large),
        one_d=tuple(scale(s) for s in state.one_d),
    )


@pytest.mark.parametrize("rule", RULES)
def test_balancing_at_step_100(rule):
    # Steps 99, 100, 101. Balancing leaves the preconditioner P = Pl x Pr unchanged, so it
    # shows in the factors only: unbalanced by 4 before, they must come out balanced.
    worst_update, pairs = _run(
        rule, MIXED_LEAVES, _spiked, steps=3, count=98, adjust=_unbalance, **MIXED_CONFIG
    )
    worst_factor, worst_lipschitz = _factor_errors(pairs)
    assert max(worst_update, worst_factor, worst_lipschitz) < TOL
    for (Ql, Qr, _, _), _ in pairs:
        if Qr is not None:
            assert 0.5 < np.max(np.abs(Ql)) / np.max(np.abs(Qr)) < 2


@pytest.mark.parametrize("rule", RULES)
def test_step_size_floor(rule):
    # From t = 49999, 0.7 / sqrt(1 + t / 10000) < 0.4, so the step size is the floor 0.4.
    worst_update, pairs = _run(rule, MIXED_LEAVES, _spiked, count=49998, **MIXED_CONFIG)
    worst_factor, worst_lipschitz = _factor_errors(pairs)
    assert max(worst_update, worst_factor, worst_lipschitz) < TOL


@pytest.mark.parametrize("rule", RULES)
def test_generic_gradients(rule):
    # Gaussian gradients: the top eigenvalues of a tile's statistic can be close, and the
    # power-iteration bound of ||A||_2 then comes out up to ~10% low. After one step from
    # L = 0, L is that bound itself and A is the same in both (up to float32 rounding): it
    # must be a lower bound (a larger one would step past the Lipschitz limit), not far off.
    _, pairs = _run(rule, MIXED_LEAVES, _gaussian, steps=1, **MIXED_CONFIG)
    for (_, _, Ll, Lr), e in pairs:
        assert 0.8 * e.Ll <= Ll <= (1 + TOL) * e.Ll
        if Lr is not None:
            assert 0.8 * e.Lr <= Lr <= (1 + TOL) * e.Lr
    # A low L means a step `z = lr / L` up to ~10% longer, so factors and updates drift from
    # the exact-norm derivation by a few percent; the updates still point the same way.
    worst_update, pairs = _run(rule, MIXED_LEAVES, _gaussian, steps=4, **MIXED_CONFIG)
    assert worst_update < GENERIC_TOL
    assert _run.cosine > 0.999


def _layer_scaled(sampler):
    """`sampler`'s gradients with each layer (and leaf) at its own scale, 1e-4 to 1e2."""

    def make(rng, shape, scanned):
        sample = sampler(rng, shape, scanned)
        if scanned:
            scales = 10.0 ** rng.uniform(-4, 2, size=(shape[0],) + (1,) * (len(shape) - 1))
        else:
            scales = 10.0 ** rng.uniform(-4, 2)
        return lambda: (sample() * scales).astype(np.float32)

    return make


@pytest.mark.parametrize("rule", RULES)
def test_factors_start_from_the_first_input(rule):
    """`preconditioner_init_scale=None`: on the first step every layer's factors are
    rescaled from its own input (the reference's `_start_from`) and not stepped; later
    steps are plain steps. Gradients of every layer at its own scale, 1e-4 to 1e2."""
    config = dict(MIXED_CONFIG, preconditioner_init_scale=None)
    worst_update, pairs = _run(rule, MIXED_LEAVES, _layer_scaled(_spiked), **config)
    worst_factor, worst_lipschitz = _factor_errors(pairs)
    assert max(worst_update, worst_factor, worst_lipschitz) < TOL


@pytest.mark.parametrize("mode", ["one_diag", "all_diag"])
def test_memory_save_modes(mode):
    """`memory_save_mode`: the longer side (or every side) of each matrix leaf diagonal,
    the other cut into strips; each a large leaf of the reference's planning."""
    worst_update, pairs = _run("quad", MIXED_LEAVES, _spiked, memory_save_mode=mode, **MIXED_CONFIG)
    worst_factor, worst_lipschitz = _factor_errors(pairs)
    assert max(worst_update, worst_factor, worst_lipschitz) < TOL
    diagonal = sum(int(e.Ql.ndim == 1) + int(e.Qr is not None and e.Qr.ndim == 1) for _, e in pairs)
    matrices = sum(int(e.Qr is not None) for _, e in pairs)
    assert diagonal >= (2 if mode == "all_diag" else 1) * matrices
