"""What the step options cost: `cache_preconditioner` (a step that only applies the
factors, with and without the stored sides, and the steady-state step at the psgd_jax
schedule's floor, `p = 0.03`, against `optax.adamw`; float32) and `stochastic_rounding`
(a step that updates, bfloat16 storage, with and without it); this machine.

    python -m benchmarks step_options [--trees gpt,gpt2_small] [--rounds 3]

Every configuration is compiled once, then timed in interleaved rounds (A, B, C, ...,
A, B, C, ...), so that load on a shared machine falls on all of them alike; a
configuration's time is its fastest step over all rounds. The apply-only step uses a
probability so small that no step of the run updates; the updating step a schedule
that always returns 1 (a callable, so the sides are stored). The steady state at
`p = 0.03` is `0.97 apply + 0.03 update`: one update every 33 or 34 steps.
Writes `benchmarks/results/step_options.{json,md}` and prints a markdown table.
`--quick`: the MLP tree, one round of one step.
"""

import sys

import jax
import jax.numpy as jnp
import optax

import wkron_eqx as wk

from ._harness import TREES, broadcast_scanned, interleaved, materialise, tree_bytes, write_results


DESCRIPTION = "the step time of cache_preconditioner and stochastic_rounding"
FLOOR = 0.03  # the smallest probability of `precond_update_prob_schedule`


def _configs(scanned) -> dict:
    ours = dict(learning_rate=1e-3, dtype=jnp.float32, scanned_layers=scanned)
    never, always = 1e-9, lambda t: 1.0
    return {
        "adamw": optax.adamw(1e-3),
        "apply": wk.quad(preconditioner_update_probability=never, **ours),
        "apply_cached": wk.quad(
            preconditioner_update_probability=never, cache_preconditioner=True, **ours
        ),
        "update": wk.quad(preconditioner_update_probability=always, **ours),
        "update_cached": wk.quad(
            preconditioner_update_probability=always, cache_preconditioner=True, **ours
        ),
        "update_bf16": wk.quad(**dict(ours, dtype=jnp.bfloat16)),
        "update_bf16_sr": wk.quad(stochastic_rounding=True, **dict(ours, dtype=jnp.bfloat16)),
    }


def _tree(name: str, rounds: int, steps: int) -> dict:
    spec = TREES[name]()
    params = jax.tree.map(jnp.asarray, materialise(spec["params"], 0))
    grads = jax.tree.map(jnp.asarray, materialise(spec["params"], 1, scale=1e-3))
    scanned = broadcast_scanned(spec["params"], spec["scanned"]) if spec["scanned"] else None
    compiled, states, state_bytes = {}, {}, {}
    for key, tx in _configs(scanned).items():
        state = tx.init(params)
        state_bytes[key] = tree_bytes(state)
        compiled[key] = (
            jax.jit(tx.update, donate_argnums=(1,)).lower(grads, state, params).compile()
        )
        _, states[key] = jax.block_until_ready(compiled[key](grads, state, params))

    def step(key):
        def call():
            out, states[key] = compiled[key](grads, states[key], params)
            return out, states[key]

        return call

    times = interleaved({key: step(key) for key in compiled}, rounds, per_round=steps)
    ms = {key: min(t) for key, t in times.items()}
    for key, t in ms.items():
        print(f"  {name} {key}: {t:.1f} ms", file=sys.stderr, flush=True)
    steady = lambda suffix: (1 - FLOOR) * ms["apply" + suffix] + FLOOR * ms["update" + suffix]
    return {
        "tree": name,
        "param_bytes": tree_bytes(params),
        "ms": ms,
        "cached_over_plain_apply": ms["apply_cached"] / ms["apply"],
        "cached_over_plain_update": ms["update_cached"] / ms["update"],
        "steady_over_adamw": steady("") / ms["adamw"],
        "steady_cached_over_adamw": steady("_cached") / ms["adamw"],
        "rounding_over_nearest": ms["update_bf16_sr"] / ms["update_bf16"],
        "added_state_over_params": (state_bytes["apply_cached"] - state_bytes["apply"])
        / tree_bytes(params),
        "state_over_params": state_bytes["apply"] / tree_bytes(params),
    }


def add_arguments(parser):
    parser.add_argument("--trees", default="gpt,transformer12,gpt2_small")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")


def run(args):
    if args.quick:
        args.trees, args.rounds, args.steps = "mlp", 1, 1
    rows = [_tree(name, args.rounds, args.steps) for name in args.trees.split(",")]
    lines = [
        "| tree | apply: cached / plain | update: cached / plain | steady p=0.03 / adamw "
        "| with cache | state / params | cache adds / params | bf16 update: SR / nearest |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tree']} | {r['cached_over_plain_apply']:.2f} | "
            f"{r['cached_over_plain_update']:.2f} | {r['steady_over_adamw']:.2f} | "
            f"{r['steady_cached_over_adamw']:.2f} | {r['state_over_params']:.2f} | "
            f"{r['added_state_over_params']:.2f} | {r['rounding_over_nearest']:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    meta = {"backend": jax.default_backend(), "devices": str(jax.devices()), "jax": jax.__version__}
    notes = (
        f"Each configuration compiled once, then timed in {args.rounds} interleaved rounds of "
        f"{args.steps} steps; the fastest step of each."
    )
    write_results(
        args, {"meta": meta, "rows": rows}, text, title="What the step options cost", notes=notes
    )
