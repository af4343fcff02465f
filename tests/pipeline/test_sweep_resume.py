"""`bfn tune resume=true` unpickles the sweep's Tune state: the state is checked first against the
sha256 recorded in the sweep's MLflow parent run (pipeline/sweeps/tune_state.py), and a planted
pickle is refused before anything loads it; MLflow errors on the way are masked. Real MLflow
sqlite store, real files; no Ray runtime.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load
from pipeline.sweeps import runner, store, tune_state


class Plant:
    """A pickle that writes a marker file when it is loaded: what a planted tuner.pkl could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A config whose tracking is a fresh sqlite store, and the sweep's parent run in it."""
    root = tmp_path_factory.mktemp("resume")
    cfg = load(["experiment=smoke", f"paths.runs_dir={root / 'runs'}", f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
                "tracking.experiment=sweeps"])  # fmt: skip
    parent = store.start_parent(cfg, "s1", {"tune.space": "lr"}, "test sweep", resume=False)
    return cfg, parent.run_id, root


def _state(folder: Path) -> Path:
    """A sweep's Tune experiment folder as Tune leaves it (file names as Ray 2.60 writes them)."""
    folder.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(pickle.dumps({"_tuner_kwargs": {}}))
    (folder / "trainable.pkl").write_bytes(pickle.dumps("run_trial"))
    (folder / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": []}')
    (folder / "basic-variant-state-2026-01-01_00-00-00.json").write_text("{}")
    trial = folder / "run_trial_a1b2c_00000_0_lr=0.0010"
    trial.mkdir()
    (trial / "params.pkl").write_bytes(pickle.dumps({"optim.lr": 1e-3}))
    (trial / "result.json").write_text('{"step": 2}\n')
    return folder


def _record(cfg, run_id: str, folder: Path) -> None:
    with runner.recording_state(cfg.tracking.uri, run_id, str(folder)):
        pass  # the sweep's trials run here; the state is recorded once more on the way out


def test_a_planted_tuner_pkl_is_refused_before_it_is_loaded(tracked, tmp_path):
    cfg, run_id, _ = tracked
    folder = _state(tmp_path / "tune" / "s1")
    _record(cfg, run_id, folder)
    tune_state.verify(cfg, "s1", str(folder))  # the state the sweep saved restores
    (folder / "run_trial_a1b2c_00000_0_lr=0.0010" / "result.json").write_text('{"step": 4}\n')
    tune_state.verify(cfg, "s1", str(folder))  # results are JSON Tune parses, not restore state

    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(Plant(proof)))
    assert proof.exists()  # the planted pickle runs code when loaded
    marker = tmp_path / "marker"
    (folder / "tuner.pkl").write_bytes(pickle.dumps(Plant(marker)))
    with pytest.raises(ConfigError) as info:
        tune_state.verify(cfg, "s1", str(folder))
    message = str(info.value)
    assert message.startswith("resume: the Tune state at") and "changed, added or removed: tuner.pkl" in message
    assert "pickle" in message and "trust_storage=true" in message
    assert not marker.exists()


def test_a_pickle_added_to_a_trial_folder_is_refused(tracked, tmp_path):
    cfg, run_id, _ = tracked
    folder = _state(tmp_path / "tune" / "s1")
    _record(cfg, run_id, folder)
    (folder / "run_trial_a1b2c_00000_0_lr=0.0010" / "error.pkl").write_bytes(pickle.dumps(Plant(tmp_path / "m")))
    with pytest.raises(ConfigError, match="a file in a trial folder: 5 files recorded, 6 now"):
        tune_state.verify(cfg, "s1", str(folder))


def test_no_record_no_restore(tracked, tmp_path):
    """A sweep without recorded hashes (tracking off, or MLflow down while it ran) is not restored
    unless the user vouches for its storage."""
    cfg, _, root = tracked
    folder = _state(tmp_path / "tune" / "s2")
    with pytest.raises(ConfigError, match="resume: no sha256 of the Tune state .* trust_storage=true"):
        tune_state.verify(cfg, "s2", str(folder))  # no parent run s2
    untracked = load(["experiment=smoke", f"paths.runs_dir={root / 'runs'}", "tracking=none"])
    with pytest.raises(ConfigError, match="resume: no sha256"):
        tune_state.verify(untracked, "s1", str(folder))


def test_an_unreadable_mlflow_error_is_masked(tmp_path):
    """MLflow's own error text may carry the URI's credentials: the refusal masks them."""
    cfg = load(["experiment=smoke", "tracking.uri=http://user:sekret@127.0.0.1:9/", "tracking.experiment=x"])
    folder = _state(tmp_path / "tune" / "s3")
    with pytest.raises(ConfigError, match="resume: cannot read the sweep's recorded sha256") as info:
        tune_state.verify(cfg, "s3", str(folder))
    assert "sekret" not in str(info.value)


def test_an_unreachable_mlflow_is_a_masked_warning(caplog):
    """The sweep's parent run and a trial's run cannot be created: the sweep goes on untracked, and
    the warnings do not carry the URI's credentials (MLflow's own error text does)."""
    import logging

    cfg = load(["experiment=smoke", "tracking.uri=http://user:sekret@127.0.0.1:9/", "tracking.experiment=x"])
    with caplog.at_level(logging.WARNING, logger="pipeline.sweeps.store"):
        assert store.start_parent(cfg, "s", {"tune.space": "lr"}, "note", resume=False) is None
        assert store.open_run(cfg, "s-trial", {store.ROLE_TAG: "trial"}) is None
    ours = [r.getMessage() for r in caplog.records if r.name == "pipeline.sweeps.store"]
    assert len(ours) == 2 and all("127.0.0.1:9" in m and "***" in m for m in ours), ours
    assert "sekret" not in caplog.text
