"""Trained BFNs as MLflow models (``pipeline.evaluation.models``): logged into a run, registered with the
alias champion, loaded by `mlflow.pyfunc.load_model` in a fresh process and sampled; `bfn sample` and
`bfn eval` take ``models:/NAME@champion`` like a checkpoint folder. A real sqlite MLflow store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import cli
from pipeline.config import load
from pipeline.core.build import build_model
from pipeline.evaluation import models
from tests.conftest import REPO


@pytest.fixture
def champion(tmp_path, monkeypatch):
    """A freshly built tiny MNIST BFN logged into a run and registered as tiny-study@champion."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = load(["experiment=smoke", f"tracking.uri={uri}", f"tracking.artifact_location={tmp_path / 'artifacts'}"])
    torch.manual_seed(0)
    weights = build_model(cfg).state_dict()
    client = MlflowClient(uri)
    experiment = client.create_experiment("models-test", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    model_id = models.log_model(uri, run_id, weights, cfg.raw, step=6)
    assert model_id is not None
    assert os.environ["MLFLOW_TRACKING_URI"] == uri  # the process's MLflow settings put back
    assert models.register_champion(uri, "tiny-study", run_id) == 1
    return uri, run_id, model_id, weights, cfg


def test_a_registered_model_loads_in_a_fresh_process_and_samples(champion):
    uri, run_id, model_id, _, cfg = champion
    code = (
        "import json, sys, mlflow\n"
        "model = mlflow.pyfunc.load_model('models:/tiny-study@champion')\n"
        "out = model.predict(None, params={'num_samples': 3, 'sampler': 'ode2', 'nfe': 3, 'seed': 1})\n"
        "again = model.predict(None, params={'num_samples': 3, 'sampler': 'ode2', 'nfe': 3, 'seed': 1})\n"
        "sig = model.metadata.signature\n"
        "print(json.dumps({'shape': list(out.shape), 'dtype': str(out.dtype),"
        " 'values': sorted(set(out.ravel().tolist())), 'same': bool((out == again).all()),"
        " 'params': sorted(p.name for p in sig.params),"
        " 'modules': sorted(m for m in sys.modules if m.startswith('pipeline.training'))}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["shape"] == [3, *cfg.data.data_shape] and out["dtype"] == "uint8"
    assert set(out["values"]) <= {0, 255} and out["same"]  # binarised MNIST pixels, seeded
    assert out["params"] == ["grid", "nfe", "num_samples", "sampler", "seed"]
    assert out["modules"] == []  # the pyfunc needs no training code


def test_the_model_holds_weights_config_and_no_pickle(champion):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri, run_id, model_id, weights, _ = champion
    client = MlflowClient(uri)
    assert models.logged_model(client, run_id) == model_id
    version = client.get_model_version_by_alias("tiny-study", "champion")
    assert version.run_id == run_id and version.source == f"models:/{model_id}"
    local = mlflow.artifacts.download_artifacts(f"models:/{model_id}", tracking_uri=uri)
    files = {p.relative_to(local).as_posix() for p in Path(local).rglob("*") if p.is_file()}
    assert {"MLmodel", "artifacts/weights.pt", "artifacts/config.json", "pyfunc_code.py"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle"))]
    read, config = models.read_registered("models:/tiny-study@champion", uri)
    assert all(torch.equal(read[k], weights[k]) for k in weights) and config["net"]["name"] == "mnist_unet_tiny"


def test_bfn_sample_takes_a_registered_model_and_names_a_missing_alias(champion, tmp_path, capsys):
    out = tmp_path / "grid"
    assert cli.main(["sample", "models:/tiny-study@champion", "--num", "4", "--nfe", "2", "--out", str(out)]) == 0
    assert out.with_suffix(".png").stat().st_size > 0
    assert cli.main(["sample", "models:/tiny-study@best", "--num", "4", "--nfe", "2"]) == 2
    err = capsys.readouterr().err
    assert "'tiny-study'" in err and "'best'" in err
    assert cli.main(["sample", "models:/tiny-study@champion", "--raw-weights"]) == 2
    assert "--raw-weights" in capsys.readouterr().err


def test_a_logging_failure_is_a_warning(tmp_path, caplog):
    cfg = load(["experiment=smoke"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert models.log_model(uri, "no-such-run", build_model(cfg).state_dict(), cfg.raw) is None
    assert "model was not logged" in caplog.text


def test_a_conditional_model_takes_a_class_and_a_guidance_scale(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = load(["experiment=smoke", "model=conditional", "eval.guidance=1.0", f"tracking.uri={uri}"])
    torch.manual_seed(0)
    weights = build_model(cfg).state_dict()
    for key, value in weights.items():  # a fresh U-Net's output layer is zero: random weights listen to the label
        if value.is_floating_point():
            weights[key] = value + 0.3 * torch.randn_like(value)
    client = MlflowClient(uri)
    experiment = client.create_experiment("cond-models", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    model_id = models.log_model(uri, run_id, weights, cfg.raw, step=1)
    code = (
        "import json, mlflow\n"
        f"model = mlflow.pyfunc.load_model('models:/{model_id}')\n"
        "base = {'num_samples': 4, 'nfe': 3, 'seed': 0}\n"
        "draw = lambda **p: model.predict(None, params={**base, **p})\n"
        "guided = {'class': 3, 'guidance': 2.0}\n"
        "three, again, unlabelled = draw(**guided), draw(**guided), draw()\n"
        "errors = []\n"
        "for bad in ({'class': 10}, {'guidance': 1.0}):\n"
        "    try:\n"
        "        draw(**bad)\n"
        "    except Exception as error:\n"
        "        errors.append(str(error))\n"
        "print(json.dumps({'params': sorted(p.name for p in model.metadata.signature.params),"
        " 'same': bool((three == again).all()), 'differs': bool((three != unlabelled).any()), 'errors': errors}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, env=os.environ.copy()
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["params"] == ["class", "grid", "guidance", "nfe", "num_samples", "sampler", "seed"]
    assert out["same"] and out["differs"]  # seeded; the label reaches the network
    assert "classes 0..9" in out["errors"][0] and "give class too" in out["errors"][1]
