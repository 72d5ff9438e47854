"""The benchmarks: `python -m benchmarks` lists them, `python -m benchmarks NAME [--quick]`
runs one. Each public module of this package is one benchmark, with a `DESCRIPTION`,
`add_arguments(parser)` and `run(args)`; `_harness` is what they share."""
