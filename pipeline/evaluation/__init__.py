"""Evaluation: `bfn eval`/`bfn sample`, figures, benchmarks."""
