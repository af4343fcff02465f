"""`bfn tune resume=true` unpickles the sweep's Tune state: the state is checked first against the
sha256 recorded in the sweep's MLflow parent run (pipeline/sweeps/tune_state.py), and a planted
pickle is refused before anything loads it; MLflow errors on the way are masked. Real MLflow
sqlite store, real files; no Ray runtime.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

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
    cfg = load(
        [
            "experiment=smoke",
            f"paths.runs_dir={root / 'runs'}",
            f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
            "tracking.experiment=sweeps",
        ]
    )
    parent = store.start_parent(cfg, "s1", {"tune.space": "lr"}, "test sweep", resume=False)
    return cfg, parent.run_id, root


class Sweep:
    """A sweep as Tune runs it: the Tuner writes tuner.pkl into the storage; at every save Tune
    writes its state into the driver's staging folder, asks its callbacks for their state (the
    recorder hashes then) and uploads the staging folder over the storage (file names as Ray 2.60
    writes them)."""

    def __init__(self, tracked, tmp_path: Path, name: str = "s1") -> None:
        self.cfg, self.run_id, _ = tracked
        self.storage, self.staging = tmp_path / "tune" / name, tmp_path / "staging" / name
        self.trial = "run_trial_a1b2c_00000_0_lr=0.0010"
        self.saves = 0
        self.recorder = runner.TuneStateRecorder()
        trial = SimpleNamespace(storage=SimpleNamespace(experiment_driver_staging_path=str(self.staging)))
        self.recorder.on_step_begin(0, [trial])

    def start(self) -> None:
        self.storage.mkdir(parents=True)
        (self.storage / "tuner.pkl").write_bytes(pickle.dumps({"_tuner_kwargs": {}}))
        runner.note_tuner_pkl()

    def save(self, *, upload: bool = True) -> None:
        self.saves += 1
        trial = self.staging / self.trial
        trial.mkdir(parents=True, exist_ok=True)
        (self.staging / "experiment_state-2026-01-01_00-00-00.json").write_text(f'{{"trial_data": [{self.saves}]}}')
        (self.staging / "basic-variant-state-2026-01-01_00-00-00.json").write_text("{}")
        (trial / "params.pkl").write_bytes(pickle.dumps({"optim.lr": 1e-3}))
        (trial / "result.json").write_text(f'{{"step": {self.saves}}}\n')
        assert self.recorder.get_state() is None  # no callback file is written after the hash
        if upload:
            shutil.copytree(self.staging, self.storage, dirs_exist_ok=True)

    def recording(self, base: dict | None = None):
        return runner.recording_state(self.cfg.tracking.uri, self.run_id, str(self.storage), base=base)

    def verify(self) -> dict[str, str]:
        return tune_state.verify(self.cfg, "s1", str(self.storage))


def test_a_planted_tuner_pkl_is_refused_before_it_is_loaded(tracked, tmp_path):
    sweep = Sweep(tracked, tmp_path)
    with sweep.recording():
        sweep.start()
        sweep.save()
    sweep.verify()  # the state the sweep saved restores
    (sweep.storage / sweep.trial / "result.json").write_text('{"step": 4}\n')
    sweep.verify()  # results are JSON Tune parses, not restore state

    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(Plant(proof)))
    assert proof.exists()  # the planted pickle runs code when loaded
    marker = tmp_path / "marker"
    (sweep.storage / "tuner.pkl").write_bytes(pickle.dumps(Plant(marker)))
    with pytest.raises(ConfigError) as info:
        sweep.verify()
    message = str(info.value)
    assert message.startswith("resume: the Tune state at") and "changed, added or removed: tuner.pkl" in message
    assert "pickle" in message and "trust_storage=true" in message
    assert not marker.exists()


def test_a_pickle_added_to_a_trial_folder_is_refused(tracked, tmp_path):
    sweep = Sweep(tracked, tmp_path)
    with sweep.recording():
        sweep.start()
        sweep.save()
    (sweep.storage / sweep.trial / "error.pkl").write_bytes(pickle.dumps(Plant(tmp_path / "m")))
    with pytest.raises(ConfigError, match="a file in a trial folder: 4 files recorded, 5 now"):
        sweep.verify()


def test_a_file_planted_during_the_sweep_is_never_recorded(tracked, tmp_path):
    """The record is what Tune wrote, hashed as it saved, not what the storage holds: a pickle
    planted in the storage between two saves stays outside it (the upload does not remove it)."""
    sweep = Sweep(tracked, tmp_path)
    with sweep.recording():
        sweep.start()
        sweep.save()
        (sweep.storage / sweep.trial / "error.pkl").write_bytes(pickle.dumps(Plant(tmp_path / "m")))
        sweep.save()
        sweep.save()
    with pytest.raises(ConfigError, match="a file in a trial folder: 4 files recorded, 5 now"):
        sweep.verify()


def test_a_crash_right_after_a_save_resumes(tracked, tmp_path):
    """Killed after a save was recorded but before its upload ended: the storage holds an earlier
    save, which the record still accepts; killed right after the upload: the newest."""
    sweep = Sweep(tracked, tmp_path)
    with sweep.recording():
        sweep.start()
        sweep.save()
        sweep.save()
        sweep.save(upload=False)  # the driver dies here
    checked = sweep.verify()
    recorded = store.recorded_state(sweep.cfg.tracking.uri, sweep.run_id)
    assert len(tune_state.accepted(recorded)) == 3

    with sweep.recording(base=checked):  # the resumed sweep: its first save, then a crash after the upload
        sweep.save()
    checked = sweep.verify()
    with sweep.recording(base=checked):  # and a crash before the upload of the resumed sweep's first save
        sweep.save(upload=False)
    sweep.verify()


def test_the_record_keeps_the_last_saves_only(tracked, tmp_path):
    sweep = Sweep(tracked, tmp_path)
    with sweep.recording():
        sweep.start()
        sweep.save()
        first = (sweep.storage / "experiment_state-2026-01-01_00-00-00.json").read_bytes()
        for _ in range(tune_state.RECENT):
            sweep.save()
    (sweep.storage / "experiment_state-2026-01-01_00-00-00.json").write_bytes(first)  # a stale copy put back
    with pytest.raises(ConfigError, match="changed, added or removed: experiment_state"):
        sweep.verify()


def test_no_record_no_restore(tracked, tmp_path):
    """A sweep without recorded hashes (tracking off, or MLflow down while it ran) is not restored
    unless the user vouches for its storage."""
    cfg, _, root = tracked
    folder = tmp_path / "tune" / "s2"
    folder.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(pickle.dumps({"_tuner_kwargs": {}}))
    with pytest.raises(ConfigError, match="resume: no sha256 of the Tune state .* trust_storage=true"):
        tune_state.verify(cfg, "s2", str(folder))  # no parent run s2
    untracked = load(["experiment=smoke", f"paths.runs_dir={root / 'runs'}", "tracking=none"])
    with pytest.raises(ConfigError, match="resume: no sha256"):
        tune_state.verify(untracked, "s1", str(folder))


def test_an_unreadable_mlflow_error_is_masked(tmp_path):
    """MLflow's own error text may carry the URI's credentials: the refusal masks them."""
    cfg = load(["experiment=smoke", "tracking.uri=http://user:sekret@127.0.0.1:9/", "tracking.experiment=x"])
    folder = tmp_path / "tune" / "s3"
    folder.mkdir(parents=True)
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
