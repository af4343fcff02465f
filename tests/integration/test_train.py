"""The main path for real: Parquet shards -> Ray Data -> 2 Ray Train workers -> checkpoints ->
resume, locally and over S3 (moto's HTTP server on 127.0.0.1), tracked in a real MLflow store."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline import data as data_lib
from pipeline.config import load
from pipeline.evaluation import models
from tests.servers import aws_env, create_bucket, moto_s3

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def mnist_shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("shards") / "mnist"
    data_lib.prepare("mnist", str(out), progress=False)
    return str(out)


def smoke(tmp_path: Path, shards: str, name: str, *extra: str):
    return load(
        [
            "experiment=smoke",
            f"run.name={name}",
            f"data.uri={shards}",
            f"run.storage_path={tmp_path / 'ray'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"tracking.artifact_location={tmp_path / 'artifacts'}",
            *extra,
        ]
    )


def metric_steps(cfg, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return [m.step for m in MlflowClient(cfg.tracking.uri).get_metric_history(run_id, key)]


def test_train_checkpoint_resume_and_mlflow(ray_local, mnist_shards, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.training.driver import fit

    cfg = smoke(tmp_path, mnist_shards, "resume")
    first = fit(cfg)
    assert first["step"] == 6 and first["checkpoint"]
    state = json.loads((Path(first["checkpoint"]) / "train_state.json").read_text())
    assert state["step"] == 6

    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(first["mlflow_run_id"])
    assert run.data.params["flow.beta_1"] == "9.0" and run.data.params["net.name"] == "mnist_unet_tiny"
    assert run.data.tags["dataset"] == "mnist" and int(run.data.tags["num_parameters"]) > 0
    assert {"train/loss", "val/loss", "val/nll_bits_per_dim", "val/nll_nats_per_image"} <= set(run.data.metrics)
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert samples and all(p.endswith(".png") for p in samples)
    # every worker's system metrics, one series per rank on the step axis (tracking.system_metrics)
    for rank in (0, 1):
        for key in ("cpu_utilization_percentage", "memory_rss_megabytes"):
            assert metric_steps(cfg, run.info.run_id, f"system/rank{rank}/{key}") == [2, 4, 6]
    assert run.data.metrics["system/rank1/memory_rss_megabytes"] > 10
    # the final EMA weights as the run's MLflow model, the weights of the last checkpoint
    assert first["mlflow_model_id"] and models.logged_model(client, run.info.run_id) == first["mlflow_model_id"]

    # same name again with more steps: resumes at step 6, not 0, in the same MLflow run
    second = fit(smoke(tmp_path, mnist_shards, "resume", "trainer.max_steps=9"))
    assert second["step"] == 9 and second["mlflow_run_id"] == first["mlflow_run_id"]
    steps = metric_steps(cfg, run.info.run_id, "train/loss")
    assert steps == [2, 4, 6, 8, 9], steps  # one continuous step axis, nothing trained twice
    kept = [p for p in (tmp_path / "ray" / "resume").glob("checkpoint_*") if p.is_dir()]
    assert len(kept) == cfg.trainer.num_to_keep
    # MLflow keeps a param's first value; the resume's is a tag (the driver's calls after it are not held back)
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["bfn.resumed.trainer.max_steps"] == "9" and tags["final_checkpoint"] == second["checkpoint"]

    # the run folder deleted, the same name again: a training from step 0 in a new MLflow run, the old axis kept
    shutil.rmtree(tmp_path / "ray" / "resume")
    third = fit(
        smoke(
            tmp_path,
            mnist_shards,
            "resume",
            "trainer.max_steps=2",
            "trainer.val_every=2",
            "trainer.checkpoint_every=2",
            "eval.num_samples=0",
            "tracking.system_metrics=false",
        )
    )
    assert third["step"] == 2 and third["mlflow_run_id"] != first["mlflow_run_id"]
    assert not [k for k in client.get_run(third["mlflow_run_id"]).data.metrics if k.startswith("system/")]
    assert metric_steps(cfg, run.info.run_id, "train/loss") == [2, 4, 6, 8, 9]
    assert metric_steps(cfg, third["mlflow_run_id"], "train/loss") == [2]


def test_train_and_resume_over_s3(ray_local, tmp_path):
    import boto3

    from pipeline.training.driver import fit

    with moto_s3() as endpoint, aws_env(endpoint):
        create_bucket(endpoint, "bfn")
        shards = "s3://bfn/shards/mnist"
        source = data_lib.raw_dir() / "mnist"
        data_lib.prepare("mnist", shards, source=str(source), progress=False)
        extra = (
            "run.storage_path=s3://bfn/ray",
            "trainer.max_steps=3",
            "trainer.val_every=3",
            "trainer.checkpoint_every=3",
            "eval.num_samples=0",
        )
        first = fit(smoke(tmp_path, shards, "s3run", *extra))
        assert first["step"] == 3
        second = fit(
            smoke(
                tmp_path,
                shards,
                "s3run",
                *extra[:1],
                "trainer.max_steps=5",
                "trainer.val_every=5",
                "trainer.checkpoint_every=5",
                "eval.num_samples=0",
            )
        )
        assert second["step"] == 5
        s3 = boto3.client("s3", endpoint_url=endpoint)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="bfn", Prefix="ray/s3run/")["Contents"]]
        assert any(k.endswith("/COMPLETE") for k in keys) and any(k.endswith("/model.pt") for k in keys)
        cfg = smoke(tmp_path, shards, "s3run")
        assert metric_steps(cfg, first["mlflow_run_id"], "train/loss") == [2, 3, 4, 5]
    assert "AWS_ENDPOINT_URL" not in os.environ or os.environ["AWS_ENDPOINT_URL"] != endpoint


def test_fine_tuning_starts_a_new_run_from_another_runs_weights(ray_local, mnist_shards, tmp_path):
    """run.init_from: a new run (step 0, its own MLflow run and checkpoints) whose initial weights
    are the source checkpoint's. With a vanishing lr its weights stay the source's, not a fresh net's."""
    import torch

    from pipeline.core import checkpointing
    from pipeline.training.driver import fit

    extra = ("trainer.max_steps=3", "trainer.val_every=3", "trainer.checkpoint_every=3", "eval.num_samples=0")
    source = fit(smoke(tmp_path, mnist_shards, "source", *extra))
    tuned = fit(
        smoke(tmp_path, mnist_shards, "tuned", *extra, "optim.lr=1e-12", f"run.init_from={source['checkpoint']}")
    )
    assert tuned["step"] == 3 and tuned["mlflow_run_id"] != source["mlflow_run_id"]
    assert "/tuned/" in tuned["checkpoint"]
    before = checkpointing.read(source["checkpoint"])["model"]
    after = checkpointing.read(tuned["checkpoint"])["model"]
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    fresh = fit(smoke(tmp_path, mnist_shards, "fresh", *extra, "optim.lr=1e-12"))
    initial = checkpointing.read(fresh["checkpoint"])["model"]
    assert not all(torch.allclose(before[k], initial[k], atol=1e-6) for k in before)


def test_validation_logs_sample_quality_per_sampler_and_nfe(ray_local, tmp_path):
    """eval.quality_*: through Ray Train, each validation logs one point per (sampler, NFE) to MLflow,
    on the step axis, with that point's samples as artifacts; the classifier is trained once, cached.
    The run is class-conditional (model=conditional; one fit covers both): labelled Ray batches reach
    the step, and each validation logs a grid with one row per class."""
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from pipeline.core import checkpointing
    from pipeline.training.driver import fit
    from tests.pipeline.test_data import write_idx_folder

    write_idx_folder(tmp_path / "idx", 300, 40)  # small data: the classifier trains in seconds
    shards = str(tmp_path / "shards")
    data_lib.prepare("mnist", shards, source=str(tmp_path / "idx"), progress=False)
    cache = tmp_path / "classifiers"
    cfg = smoke(
        tmp_path,
        shards,
        "quality",
        "data.fraction=1.0",
        "eval.quality_samplers=[sde2,paper]",
        "eval.quality_nfe=[2,3]",
        "eval.quality_num=4",
        f"eval.quality_cache={cache}",
        "model=conditional",
        "eval.guidance=1.0",
    )
    result = fit(cfg)
    assert result["step"] == 6
    weights = checkpointing.read(result["checkpoint"])["model"]
    assert weights["net.label_embedding.table.weight"].shape[0] == 11  # 10 classes + "no condition"

    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(result["mlflow_run_id"])
    for sampler in ("sde2", "paper"):
        for nfe in (2, 3):
            for metric in ("fd", "confidence", "label_entropy_bits", "seconds_per_sample"):
                key = f"quality/{sampler}/nfe_{nfe}/{metric}"
                assert metric_steps(cfg, run.info.run_id, key) == [3, 6], key  # each validation after step 0
    fd = client.get_metric_history(run.info.run_id, "quality/sde2/nfe_3/fd")
    assert all(m.value >= 0 and m.value == m.value for m in fd)
    artifacts = sorted(a.path.split("/")[-1] for a in client.list_artifacts(run.info.run_id, "quality"))
    assert "sde2_nfe3_step00000006.png" in artifacts and "paper_nfe2_step00000003.png" in artifacts
    assert len(artifacts) == 2 * 2 * 2
    assert [p.name for p in cache.iterdir()] and all(p.name.startswith("mnist-") for p in cache.iterdir())
    grids = sorted(a.path.split("/")[-1] for a in client.list_artifacts(run.info.run_id, "samples"))
    assert grids == ["step_00000003.png", "step_00000006.png"], grids
    assert Image.open(result["run_dir"] + "/samples/step_00000006.png").size[1] == 3 * (10 * 29 + 1)  # a row per class


@pytest.mark.standalone
def test_what_a_person_sees_from_bfn_train(mnist_shards, tmp_path):
    """`bfn train` prints one progress line per log interval and a validation table, not Ray's
    report dictionaries or its INFO chatter (those come with -v)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    args = [
        "experiment=smoke",
        "run.name=person",
        f"data.uri={mnist_shards}",
        f"run.storage_path={tmp_path / 'ray'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.artifact_location={tmp_path / 'a'}",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "TrainingReport(" not in out and "Reporting training result" not in out
    assert "Requesting resources" not in out and "Wrapping provided model" not in out
    assert "Starting execution of Dataset" not in out and "mlflow.store.db.utils" not in out
    assert "Progress bars disabled" not in out and "Grad strides" not in out
    progress = [line for line in out.splitlines() if "[bfn] step " in line]
    assert len(progress) == 3 and "step 6/6" in progress[-1] and "ETA" in progress[0], progress  # log_every 2
    assert "validation at step 6" in out and "NLL bound" in out and "finished at step 6" in out


@pytest.mark.standalone
def test_a_stale_ray_cluster_on_the_machine_is_never_joined(mnist_shards, tmp_path):
    """A bootstrap file naming a cluster that is gone (a killed `ray start`, a crashed session) must not
    make `bfn train` try to join it: an embedded runtime always starts its own (run.ray_address joins)."""
    import subprocess
    import sys
    import tempfile

    from tests.conftest import REPO

    ray_tmp = Path(tempfile.mkdtemp(prefix="bfnst-"))  # short: Ray's Unix sockets live below it
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # nothing listens on port 9
        args = [
            "experiment=smoke",
            "run.name=stale",
            f"data.uri={mnist_shards}",
            "trainer.max_steps=2",
            f"run.storage_path={tmp_path / 'ray'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"tracking.artifact_location={tmp_path / 'a'}",
        ]
        env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
        result = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "train", *args],
            cwd=REPO,
            text=True,
            capture_output=True,
            timeout=600,
            env=env,
        )
        out = result.stdout + result.stderr
        assert result.returncode == 0, out[-3000:]
        assert "finished at step 2" in out and "existing cluster" not in out
        assert (ray_tmp / "ray" / "ray_current_cluster").read_text() == "127.0.0.1:9"  # the other one untouched
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
