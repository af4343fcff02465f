"""Sweeps: `bfn tune` (Ray Tune) and `bfn scaling` (scaling-law grids and fits).

tune.py and scaling.py are the commands; runner.py runs configs as Tune trials for both; store.py
is the only module that reads or writes MLflow; reports.py writes tables and plots; fit.py is the
scaling-law fit (numpy/scipy only); spaces.py checks a search space with the config's own
validation; export.py turns the best trial into a preset; tune_state.py guards `resume=true`;
placement_groups.py holds the one call into Ray's private API.
"""
