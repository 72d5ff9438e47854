"""The leaf kinds. Each module has the same interface, so the step loops over them:

- `KIND`: its `LeafKind`;
- `init(plan, config) -> state`: the factors of every leaf of that kind;
- `update(ctx, inputs, state, slots, plan, refresh, axis_name) -> (outputs, state,
  sum_sq)`, with `inputs`, `slots` and `outputs` keyed by leaf index (each leaf viewed
  as `[B, m, n]`, or `[B, n]` for a 1-D leaf; `slots` its `WhiteKronState.slots`
  entry, where it sits in the kind's shared arrays) and `sum_sq` each leaf's sum of
  squared outputs (0 for the other kinds' leaves), which the RMS clip needs: computed
  per stack, it costs one reduction per kind instead of one per leaf.

The dense kind's state is a tuple of `DenseState` buckets; the others' a dict from
leaf index to `LeafState`.
"""

from . import dense as dense, large as large, one_d as one_d


KINDS = (dense, large, one_d)
