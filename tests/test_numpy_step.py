"""Our `scale_by_quad` / `scale_by_skew` against the float64 NumPy re-derivation of SPEC
section 3 in `numpy_reference.py`, over several steps, on every leaf kind.

Tolerances. Ours runs in float32 (`dtype=jnp.float32`, `noise_scale=0`), the reference in
float64, so updates and factors should agree to a few float32 ulps amplified by a few steps:
`TOL` (relative to each array's max-abs) below. The one *algorithmic* difference is the
Lipschitz statistic of a dense factor: ours bounds `||A||_2` from below by a few power
iterations, the reference takes the exact norm. Power iteration converges geometrically in
`lambda_2 / lambda_1`, so the "spiked" gradients (a fixed rank-1 direction plus small noise)
used for the tight comparisons make `A` have a dominant eigenvalue and the bound exact to
float32 precision. `test_generic_gradients` then uses plain Gaussian gradients, where the gap is
small (the bound can be off by a few percent): there we assert the bound is a lower bound
of the exact norm and that updates still agree to `GENERIC_TOL`, which is what the bound costs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wkron_eqx as wk

from .numpy_reference import ReferenceOptimizer


TOL = 2e-5
GENERIC_TOL = 3e-2
STEPS = 4

_SCALE_BY = {"quad": wk.scale_by_quad, "skew": wk.scale_by_skew}


@functools.cache
def _transform(rule: str, **config):
    """One jitted update per configuration, so that cases sharing one reuse its compile."""
    tx = _SCALE_BY[rule](dtype=jnp.float32, noise_scale=0.0, **config)
    return tx.init, jax.jit(tx.update)


def _spiked(rng: np.random.Generator, shape, scanned: bool):
    """A gradient sampler for `shape`: a fixed rank-1 direction per layer times a random
    scale, plus small noise, so every tile's statistic has a dominant eigenvalue."""
    batch, layer = (shape[0], shape[1:]) if scanned else (1, shape)
    size = int(np.prod(layer))
    split = max(1, int(np.sqrt(size)))
    while size % split:
        split -= 1
    u = rng.standard_normal((batch, split, 1))
    v = rng.standard_normal((batch, 1, size // split))

    def sample():
        scale = 1 + 0.3 * rng.standard_normal((batch, 1, 1))
        g = scale * u * v + 0.03 * rng.standard_normal((batch, split, size // split))
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
    """The factors of one leaf's entries in our state, as `(Ql, Qr, Ll, Lr)` cut to their
    valid sizes (dense leaves: every real tile of every bucket, keyed by valid size)."""
    leaf = jax.tree.leaves(state.leaves, is_leaf=lambda x: isinstance(x, wk.LeafState))[leaf_index]
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


def _match_factors(state, ref: ReferenceOptimizer, leaf_indices) -> float:
    """Match every reference entry to one of ours (the closest of the same valid sizes) and
    require the matching to be a bijection; return the worst factor error.

    Matching, rather than indexing, keeps this test independent of how tiles are ordered in
    the buckets. Dense tiles of all leaves share buckets, so they are matched together.
    """
    dense = [i for i in leaf_indices if ref.leaves[i].kind == "dense"]
    groups = [dense] if dense else []
    groups += [[i] for i in leaf_indices if ref.leaves[i].kind != "dense"]
    worst = 0.0
    for group in groups:
        ours = _our_entries(state, group[0])
        refs = [e for i in group for e in ref.leaves[i].entries]
        assert len(ours) == len(refs)
        errors = np.array([[_entry_error(o, e) for o in ours] for e in refs])
        best = np.argmin(errors, axis=1)
        assert sorted(best.tolist()) == list(range(len(ours))), "factors do not match 1:1"
        for k, e in enumerate(refs):
            o = ours[best[k]]
            np.testing.assert_allclose(o[2], e.Ll, rtol=TOL)
            if o[3] is not None:
                np.testing.assert_allclose(o[3], e.Lr, rtol=TOL)
        worst = max(worst, float(np.max(errors[np.arange(len(refs)), best])))
    return worst


def _run(rule, shapes, scanned, make_sampler, *, steps=STEPS, count=0, seed=0, **config):
    """Run ours and the reference side by side; return (max update error, max factor
    error, final state, reference)."""
    rng = np.random.default_rng(seed)
    samplers = [make_sampler(rng, s, f) for s, f in zip(shapes, scanned, strict=True)]
    scanned_config = {"scanned_layers": list(scanned)} if any(scanned) else {}
    init, update = _transform(rule, **scanned_config, **_hashable(config))
    params = [jnp.zeros(s, jnp.float32) for s in shapes]
    state = init(params)
    state = state._replace(count=jnp.asarray(count, jnp.int32))
    ref = ReferenceOptimizer(rule, shapes, list(scanned), count=count, **config)
    worst_update = 0.0
    for _ in range(steps):
        grads = [sample() for sample in samplers]
        updates, state = update([jnp.asarray(g) for g in grads], state)
        expected = ref.step(grads)
        for u, e in zip(updates, expected, strict=True):
            assert u.shape == e.shape and u.dtype == jnp.float32
            worst_update = max(worst_update, _rel(u, e))
    worst_factor = _match_factors(state, ref, range(len(shapes)))
    return worst_update, worst_factor, state, ref


def _hashable(config: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
