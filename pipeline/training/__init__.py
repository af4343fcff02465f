"""Training: the driver (`bfn train`), the per-worker loop, one step, checkpoints, model building."""
