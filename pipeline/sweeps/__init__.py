"""Sweeps: `bfn tune` (Ray Tune) and `bfn scaling` (scaling-law grids and fits)."""
