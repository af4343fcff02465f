"""Bad input fails before Ray starts, with one line naming the culprit.

* Config: a table of bad values for every user-facing knob (data type vs flow, bins, sigma_1,
  beta_1, batch vs workers, optimiser, trainer, paths, URIs, unknown preset, unknown or misspelt
  key); each raises ConfigError naming the key (`pipeline.config.load`, what every command runs
  first).
* Through the real `bfn train` command (a subprocess with a fresh, empty RAY_TMPDIR): a few of
  those config errors, and damaged data (truncated, corrupt, wrong schema, out-of-range values,
  missing manifest) exit with status 2 and one stderr line naming the key or the shard, quickly,
  and no Ray runtime was started (no session folder appears in RAY_TMPDIR).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import data as data_lib
from pipeline.config import Config, ConfigError, compose, load
from pipeline.training.ray_runtime import check_storage_is_shared
from tests.pipeline.test_data import write_idx_folder

CIFAR = "experiment=cifar10_discretized_256"
CONTINUOUS = "experiment=cifar10_continuous"
TEXT = "experiment=text8"
BAD = [  # (overrides, the key the message must name)
    # data type vs flow vs network
    (["data=cifar10"], "flow.kind"),
    (["flow=continuous"], "flow.kind"),
    (["data=text8", "net=text8_transformer_tiny"], "flow.num_classes"),
    ([CIFAR, "flow=discrete_binary"], "flow.kind"),
    (["net=text8_transformer_tiny"], "net.arch"),
    ([TEXT, "net=mnist_unet_tiny"], "net.arch"),
    (["data.name=svhn"], "data.name"),
    (["flow.kind=gaussian"], "flow.kind"),
    (["flow.num_classes=3"], "flow.num_classes"),
    ([TEXT, "flow.head=bernoulli"], "flow.head"),
    (["flow.head=delta"], "flow.head"),
    (["flow.head=softmax"], "flow.head"),
    ([CIFAR, "flow.head=categorical"], "flow.head"),
    (["flow.receiver=mine"], "flow.receiver"),
    (["flow.num_mc_samples=0"], "flow.num_mc_samples"),
    # bins
    ([CIFAR, "data.num_bins=1"], "data.num_bins"),
    ([CIFAR, "data.num_bins=300"], "data.num_bins"),
    ([CIFAR, "data.num_bins=2.5"], "data.num_bins"),
    ([CIFAR, "data.num_bins=null"], "data.num_bins"),
    ([CONTINUOUS, "flow.reconstruction_std_scale=0"], "flow.reconstruction_std_scale"),
    ([CONTINUOUS, "flow.reconstruction_std_scale=null"], "flow.reconstruction_std_scale"),
    # keys the chosen setup does not use: set is an error, null where needed is an error
    (["experiment=smoke", "flow.sigma_1=2"], "flow.sigma_1"),
    ([CIFAR, "flow.beta_1=4"], "flow.beta_1"),
    (["data.num_bins=16"], "data.num_bins"),
    ([TEXT, "data.num_bins=27"], "data.num_bins"),
    (["data.seq_len=256"], "data.seq_len"),
    ([CIFAR, "data.seq_len=256"], "data.seq_len"),
    ([TEXT, "data.seq_len=null"], "data.seq_len"),
    (["flow.noise_prediction=true"], "flow.noise_prediction"),
    ([CIFAR, "flow.noise_prediction=null"], "flow.noise_prediction"),
    ([CIFAR, "flow.noise_prediction=1"], "flow.noise_prediction"),
    ([CIFAR, "flow.receiver=paper"], "flow.receiver"),
    (["flow.receiver=null"], "flow.receiver"),
    ([CIFAR, "flow.num_classes=2"], "flow.num_classes"),
    (["flow.num_classes=null"], "flow.num_classes"),
    (["flow.reconstruction_std_scale=0.7"], "flow.reconstruction_std_scale"),
    ([CIFAR, "flow.reconstruction_std_scale=0.7"], "flow.reconstruction_std_scale"),
    ([CONTINUOUS, "flow.num_mc_samples=10"], "flow.num_mc_samples"),
    ([CIFAR, "flow.num_mc_samples=null"], "flow.num_mc_samples"),
    (["eval.text8_stride=1"], "eval.text8_stride"),
    ([TEXT, "eval.text8_stride=null"], "eval.text8_stride"),
    (["data=text8", "flow=discrete_text", "net=text8_transformer_tiny", "eval.unit=bits/char"], "eval.text8_stride"),
    (["trainer.amp=true"], "trainer.amp"),
    (["trainer=gpu_1", "trainer.use_gpu=false"], "trainer.amp"),
    # accuracy schedules
    *[([CIFAR, f"flow.sigma_1={v}"], "flow.sigma_1") for v in ("0", "1", "2.0", "-0.5", "nan", "inf", "abc", "null")],
    *[([f"flow.beta_1={v}"], "flow.beta_1") for v in ("0", "-1", "inf", "nan", "abc", "null", "true")],
    *[([TEXT, f"flow.beta_1={v}"], "flow.beta_1") for v in ("0", "-0.5")],
    # batch vs workers, sizes
    (["data.batch_size=33"], "data.batch_size"),
    (["trainer=cpu_2", "trainer.num_workers=3", "data.batch_size=32"], "data.batch_size"),
    ([TEXT, "data.batch_size=3330"], "data.batch_size"),
    (["data.batch_size=0"], "data.batch_size"),
    (["data.batch_size=2.5"], "data.batch_size"),
    (["data.val_batch_size=0"], "data.val_batch_size"),
    *[([f"data.fraction={v}"], "data.fraction") for v in ("0", "1.5", "-0.1", "abc")],
    ([TEXT, "data.seq_len=0"], "data.seq_len"),
    (["data.uri=''"], "data.uri"),
    (["data.uri=ftp://host/shards"], "data.uri"),
    # network: architecture and constructor arguments
    (["net.name=mnist_unet"], "net.name"),
    (["net.name=nope"], "net.name"),
    (["net.arch=transformer"], "net.arch"),
    (["++net.kwargs.widht=3"], "net.kwargs.widht"),
    (["++net.kwargs.in_channels=3"], "net.kwargs.in_channels"),
    (["++net.kwargs.seq_len=3"], "net.kwargs.seq_len"),
    ([TEXT, "++net.kwargs.model_channels=64"], "net.kwargs.model_channels"),
    (["net.kwargs=[1,2]"], "net.kwargs"),
    # optimiser
    *[([f"optim.lr={v}"], "optim.lr") for v in ("0", "-1", "inf", "abc")],
    (["optim.betas=[0.9]"], "optim.betas"),
    (["optim.betas=0.9"], "optim.betas"),
    (["optim.betas=[0.9,1.0]"], "optim.betas[1]"),
    (["optim.eps=0"], "optim.eps"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay"),
    (["optim.grad_clip=-1"], "optim.grad_clip"),
    (["optim.ema_decay=1.0"], "optim.ema_decay"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps"),
    (["optim.warmup_steps=1.5"], "optim.warmup_steps"),
    # trainer
    (["trainer.num_workers=0"], "trainer.num_workers"),
    # elastic ranges: every world size must split the global batch; extra resources; the resize check
    (["trainer.num_workers=[1,3]"], "data.batch_size"),
    (["trainer.num_workers=[2,1]"], "trainer.num_workers"),
    (["trainer.num_workers=[0,2]"], "trainer.num_workers[0]"),
    (["trainer.num_workers=[1,2,3]"], "trainer.num_workers"),
    (["trainer.resize_check_s=5"], "trainer.resize_check_s"),
    (["trainer.num_workers=[1,2]", "trainer.resize_check_s=0"], "trainer.resize_check_s"),
    (["trainer.resources={CPU:1}"], "trainer.resources.CPU"),
    (["trainer.resources={bfn_worker:0}"], "trainer.resources.bfn_worker"),
    (["trainer.cpus_per_worker=0"], "trainer.cpus_per_worker"),
    *[
        ([f"trainer.{k}=0"], f"trainer.{k}")
        for k in ("max_steps", "log_every", "val_every", "checkpoint_every", "num_to_keep", "max_bad_steps")
    ],
    (["trainer.max_steps=1.5"], "trainer.max_steps"),
    (["trainer.max_failures=-2"], "trainer.max_failures"),
    (["trainer.max_minutes=-1"], "trainer.max_minutes"),
    (["trainer.seed=-1"], "trainer.seed"),
    (["trainer.use_gpu=maybe"], "trainer.use_gpu"),
    (["trainer.amp=1"], "trainer.amp"),
    (["trainer.compile=yes"], "trainer.compile"),
    # paths, run: names, folders, URIs
    (["paths.root=''"], "paths.root"),
    (["paths.runs_dir=s3://bucket/runs"], "paths.runs_dir"),
    (["paths.data_dir=ftp://host/shards"], "paths.data_dir"),
    (["run.name=''"], "run.name"),
    (["run.name='a b'"], "run.name"),
    (["run.name=../up"], "run.name"),
    (["run.storage_path=ftp://host/runs"], "run.storage_path"),
    (["run.ray_num_cpus=0"], "run.ray_num_cpus"),
    (["++run.init_from=ftp://host/checkpoint"], "run.init_from"),
    # tracking URIs
    (["tracking.uri=mysql://127.0.0.1/mlflow"], "tracking.uri"),
    (["tracking.uri=mlruns"], "tracking.uri"),
    (["tracking=mlflow_server", "tracking.uri=null"], "tracking.uri"),
    (["tracking.enabled=maybe"], "tracking.enabled"),
    # evaluation
    (["eval.unit=furlongs"], "eval.unit"),
    (["eval.unit=bits/char"], "eval.unit"),
    ([TEXT, "eval.unit=nats/image"], "eval.unit"),
    (["eval.nll_steps=-1"], "eval.nll_steps"),
    (["eval.nll_steps=2.5"], "eval.nll_steps"),
    (["eval.nll_steps=null"], "eval.nll_steps"),
    (["eval.nll_repeats=0"], "eval.nll_repeats"),
    (["eval.val_repeats=0"], "eval.val_repeats"),
    (["eval.target_se=0"], "eval.target_se"),
    (["eval.target_se=-0.1"], "eval.target_se"),
    ([TEXT, "eval.text8_stride=0"], "eval.text8_stride"),
    (["eval.sample_steps=0"], "eval.sample_steps"),
    (["eval.val_batches=-1"], "eval.val_batches"),
    (["eval.num_samples=-1"], "eval.num_samples"),
    # unknown preset, unknown or misspelt keys, unknown groups, removed keys
    (["experiment=nope"], "experiment"),
    (["net=nope"], "net"),
    (["trainer=tpu_64"], "trainer"),
    (["eval=imagenet"], "eval"),
    (["+data.colour=red"], "data.colour"),
    (["data.colour=red"], "data.colour"),
    (["trainer.max_step=5"], "trainer.max_step"),
    (["+flow.sigma=0.1"], "flow.sigma"),
    ([CIFAR, "+flow.num_bins=16"], "flow.num_bins"),
    ([CONTINUOUS, "+flow.reconstruction_bins=16"], "flow.reconstruction_bins"),
    (["+extra=1"], "extra"),
]


@pytest.mark.parametrize(
    ("overrides", "key"), BAD, ids=[" ".join(case.values[0] if hasattr(case, "values") else case[0]) for case in BAD]
)
def test_every_bad_value_names_its_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load(overrides)
    message = str(info.value)
    assert re.search(r"(^|[^\w.])" + re.escape(key) + r"(\W|$)", message), message
    assert "\n" not in message


@pytest.mark.parametrize(
    "overrides",
    [
        ["eval.nll_steps=0"],  # n = inf: L_inf + reconstruction
        ["eval.target_se=0.01"],
        [TEXT, "eval.text8_stride=256"],
        [CIFAR, "flow.noise_prediction=false"],
        [CONTINUOUS, "flow.reconstruction_std_scale=0.7", "data.num_bins=16"],
        ["flow.receiver=paper"],
        ["++net.kwargs.model_channels=32"],
        ["++run.init_from=s3://bucket/run/checkpoint_000001"],
        ["trainer=gpu_1"],
        ["trainer.num_workers=[1,2]", "trainer.resize_check_s=5", "trainer.resources={bfn_worker:1}"],
        ["trainer.num_workers=[1,4]", "data.batch_size=24"],
    ],
)
def test_good_values_load(overrides):
    load(overrides)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.pop("eval"), "eval: section is missing"),
        (lambda c: c["flow"].pop("sigma_1"), "flow.sigma_1: is missing"),
        (lambda c: c.update(runtime={}), "runtime: unknown top-level key"),
    ],
)
def test_from_dict_names_a_missing_section_key_or_unknown_top_level_key(mutate, message):
    """What a stored or hand-built config (checkpoints, Tune trials) goes through."""
    config = compose(["experiment=smoke"])
    mutate(config)
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        Config.from_dict(config)


def test_from_dict_accepts_a_run_without_init_from():
    """run.init_from is optional in stored configs written before the key existed."""
    config = compose(["experiment=smoke"])
    config["run"].pop("init_from", None)
    assert Config.from_dict(config).run.init_from is None


# ------------------------------------------------------------------------ through `bfn train`


def bfn_train(*overrides: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`bfn train` with a fresh RAY_TMPDIR, which must stay empty: no Ray runtime was started."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="bfnc-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(ray_tmp)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])  # this checkout's code, not an installed copy
    try:
        argv = [
            sys.executable,
            "-m",
            "pipeline.cli",
            "train",
            *overrides,
            f"run.storage_path={tmp_path / 'ray'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ]
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        return result
    finally:
        left = list(ray_tmp.iterdir())
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert left == [], f"a Ray runtime was started: {left}"


def assert_one_line_error(result, needle: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bfn: error: "), result.stderr[-3000:]
    assert needle in lines[0], lines[0]
    return lines[0]


def test_an_unused_value_says_which_choice_makes_it_unused():
    with pytest.raises(ConfigError) as info:
        load(["experiment=smoke", "flow.sigma_1=2"])
    assert str(info.value) == (
        "flow.sigma_1: is not used with flow.kind=discrete (continuous schedule; discrete "
        "uses flow.beta_1); leave it null (got 2)"
    )
    with pytest.raises(ConfigError, match=r"^data\.seq_len: is not used with data\.name=cifar10 "):
        load([CIFAR, "data.seq_len=256"])
    with pytest.raises(ConfigError, match=r"^eval\.text8_stride: is required with data\.name=text8 .*eval=text8"):
        load([TEXT, "eval.text8_stride=null"])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["experiment=smoke", "flow.sigma_1=2"], "flow.sigma_1"),
        ([CIFAR, "flow.sigma_1=2.0"], "flow.sigma_1"),
        (["experiment=smoke", "data.batch_size=33"], "data.batch_size"),
        (["experiment=smoke", "trainer.max_step=5"], "trainer.max_step"),
    ],
)
def test_cli_config_error_exits_2_before_ray(overrides, key, tmp_path):
    result = bfn_train(*overrides, tmp_path=tmp_path)
    assert_one_line_error(result, key)
    assert not (tmp_path / "mlflow.db").exists()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_data")
    write_idx_folder(root / "src", 300, 40)
    data_lib.prepare("mnist", str(root / "shards"), source=str(root / "src"), rows_per_shard=64, progress=False)
    return root / "shards"


def _shard(uri: Path, split: str, i: int = 0) -> Path:
    return uri / data_lib.read_manifest(str(uri))["splits"][split]["shards"][i]["path"]


def _rewrite(uri: Path, split: str, table: pa.Table, i: int = 0) -> Path:
    """Replace a shard and make the manifest's size and checksum agree with the new file, so only
    its content (schema or values) is wrong."""
    path = _shard(uri, split, i)
    pq.write_table(table, path)
    data = path.read_bytes()
    manifest = json.loads((uri / "manifest.json").read_text())
    manifest["splits"][split]["shards"][i].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (uri / "manifest.json").write_text(json.dumps(manifest))
    return path


def _truncate(uri: Path) -> tuple[Path, str]:
    path = _shard(uri, "train", 2)
    path.write_bytes(path.read_bytes()[:-100])
    return path, "truncated"


def _corrupt(uri: Path) -> tuple[Path, str]:
    path = _shard(uri, "train", 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path, "(corrupt)"


def _wrong_schema(uri: Path) -> tuple[Path, str]:
    table = pq.read_table(_shard(uri, "val"))
    table = table.set_column(1, "label", table.column("label").cast(pa.int32()))
    return _rewrite(uri, "val", table), "column 'label' has type int32"


def _out_of_range(uri: Path) -> tuple[Path, str]:
    table = pq.read_table(_shard(uri, "train", 3))
    labels = table.column("label").to_numpy().copy()
    labels[5] = 12
    table = table.set_column(1, "label", pa.array(labels, pa.int64()))
    return _rewrite(uri, "train", table, 3), "column 'label' has values outside 0..9"


@pytest.mark.parametrize("damage", [_truncate, _corrupt, _wrong_schema, _out_of_range])
def test_cli_bad_data_names_the_shard_before_ray(prepared, tmp_path, damage):
    uri = tmp_path / "shards"
    shutil.copytree(prepared, uri)
    path, what = damage(uri)
    result = bfn_train("experiment=smoke", f"data.uri={uri}", tmp_path=tmp_path)
    line = assert_one_line_error(result, f"shard {path}")
    assert what in line


def test_cli_missing_data_names_the_manifest(tmp_path):
    result = bfn_train("experiment=smoke", f"data.uri={tmp_path / 'nowhere'}", tmp_path=tmp_path)
    assert_one_line_error(result, f"missing manifest {tmp_path / 'nowhere'}/manifest.json")


def test_a_local_run_folder_is_refused_on_a_cluster_of_several_nodes():
    """Each node would write its own folder: refused (naming the key, the node count and the remedies),
    unless the path is declared shared (NFS); one node, or object storage, is fine."""
    with pytest.raises(
        ConfigError, match=r"run.storage_path: /runs/ray is a local path and this Ray cluster has 3 nodes"
    ):
        check_storage_is_shared("/runs/ray", False, 3)
    with pytest.raises(ConfigError, match="run.shared_storage=true"):
        check_storage_is_shared("file:///runs/ray", False, 2)
    check_storage_is_shared("/runs/ray", True, 3)
    check_storage_is_shared("/runs/ray", False, 1)
    check_storage_is_shared("s3://bucket/runs", False, 3)
    assert load(["run.shared_storage=true"]).run.shared_storage is True
    with pytest.raises(ConfigError, match="run.shared_storage"):
        load(["run.shared_storage=maybe"])


def test_num_workers_range_is_ray_trains_elastic_scaling_config_and_a_number_stays_fixed():
    """A range [min, max] becomes ScalingConfig(num_workers=(min, max)) with the resize check; a number builds
    exactly the ScalingConfig of a fixed group as before (no elastic setting), and the per-worker batch is
    data.batch_size over the world size of each launch."""
    from pipeline.training.driver import scaling_config

    fixed = scaling_config(load(["trainer.num_workers=2"]))
    assert fixed.num_workers == 2 and not fixed.elasticity_enabled
    assert fixed.resources_per_worker == {"CPU": 1}
    elastic_cfg = load(["trainer.num_workers=[1,2]", "trainer.resize_check_s=5", "trainer.resources={bfn_worker:1}"])
    elastic = scaling_config(elastic_cfg)
    assert elastic.num_workers == (1, 2) and elastic.elasticity_enabled
    assert (elastic.min_workers, elastic.max_workers, elastic.elastic_resize_monitor_interval_s) == (1, 2, 5)
    assert elastic.resources_per_worker == {"CPU": 1, "bfn_worker": 1}
    assert elastic_cfg.batch_size_per_worker == elastic_cfg.data.batch_size // 2
