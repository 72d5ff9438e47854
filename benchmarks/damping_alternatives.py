"""The damping mechanisms `wkron_eqx._damping` can run, on `precision.py`'s problems.

`damping` shipped as one mechanism; this script measures it against the alternatives by
setting `_damping`'s constants while each variant's step is traced (its `init` and
`update` run inside the settings). Variants, each `<rule>-<mechanism>-<memory>+damping=d`:

- `step` (what `damping` does): each leaf's update times `min(1, r / (d M))`;
- `whitening`: the factors see `G + s N` with `s = d` times the tree's remembered RMS,
  so `P ~ (E[G G^T] + s^2 I)^(-1/2)`: the damping the noise of the factor update gives;
- memory `peak` (the running maximum of the input's RMS), `average` (an exponential
  average of its mean square, `b2 = 0.999`, bias-corrected: the prototype of the issue
  that asked for a damping) or `first` (the first step's RMS).

    python benchmarks/damping_alternatives.py --variants quad-whitening-average+damping=0.1
"""

import contextlib
import sys

import jax.numpy as jnp
import optax
import precision

import wkron_eqx as wk
import wkron_eqx._damping as damp


@contextlib.contextmanager
def _settings(mechanism: str, memory: str):
    before = damp.MECHANISM, damp.MEMORY
    damp.MECHANISM, damp.MEMORY = mechanism, memory
    try:
        yield
    finally:
        damp.MECHANISM, damp.MEMORY = before


def _variant(rule: str, mechanism: str, memory: str):
    def make(**kwargs) -> optax.GradientTransformation:
        options = dict(learning_rate=1.0, weight_decay=0.0, dtype=jnp.float32) | kwargs
        tx = getattr(wk, rule)(**options)

        def init(params):
            with _settings(mechanism, memory):
                return tx.init(params)

        def update(updates, state, params=None):
            with _settings(mechanism, memory):
                return tx.update(updates, state, params)

        return optax.GradientTransformation(init, update)

    return make


for _rule in ("quad", "skew"):
    for _mechanism in ("step", "whitening"):
        for _memory in ("peak", "average", "first"):
            precision.EXTRA_VARIANTS[f"{_rule}-{_mechanism}-{_memory}"] = _variant(
                _rule, _mechanism, _memory
            )


if __name__ == "__main__":
    precision.main(sys.argv[1:])
