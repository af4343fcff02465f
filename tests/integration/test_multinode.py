"""Several Ray nodes on this machine: a token-auth head and worker nodes, each a raylet of its own on 127.0.0.1.
(Longer than 500 lines: one stack started once serves every check; a second module would start a second cluster.)

One stack for the module (``devstack.up``: head, MLflow server, moto S3; ``devstack.add_node`` twice: worker nodes
with one CPU and the custom resource ``bfn_worker``, which every training worker asks for, so the head hosts none).
Then, through the job API as a user would (``bfn submit``, ``bfn jobs``):

* a local ``run.storage_path`` is refused before any worker starts;
* one epoch of the training split through the workers' own iteration, each rank on its node: every row once;
* one elastic run (``trainer.num_workers=[1,3]``) that lives through it all, measured: it starts on the two
  nodes, grows when a third node joins, goes on when a node's raylet is SIGKILLed, checkpoints and goes on when
  a node is drained for preemption, is stopped with ``bfn jobs stop`` and resumed by a second ``bfn submit``.

The measurements (time from the loss to the next step, steps re-done, steps/s per world size) go to
runs/test-artifacts/multinode/bench.{json,md}; docs/distributed.md holds a copy.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections import Counter
from pathlib import Path

import pytest

from pipeline.cluster import devstack
from tests.integration.test_cluster import _find_run, _http_json, _s3_keys, check_run_in_mlflow_and_s3

pytestmark = [pytest.mark.slow, pytest.mark.multinode]

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "runs" / "test-artifacts" / "multinode"
BFN = str(Path(sys.executable).parent / "bfn")
WORKER = {"bfn_worker": 1}
BATCH = 24  # divisible by world sizes 1, 2 and 3
LOG_EVERY = 2
CHECKPOINT_EVERY = 4
WAIT_S = 150  # any single wait of the scenario
# GCS declares a node dead after ~6 s without its raylet (defaults: 3 s x 5 failures, 10 s timeouts, ~25 s): the
# measured recovery times depend on these; a cluster keeps its own
RAY_SETTINGS = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "5",
}
# the elastic job: Ray Train's preemption watcher polls every second (default 5 s); a worker group that cannot
# start within 20 s (default 60 s: e.g. sized for a node GCS has not yet declared dead) is retried at the new size
JOB_ENV = (
    "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S=1",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.5",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=20",
)


# --------------------------------------------------------------------------- helpers


def _env(stack: dict) -> dict[str, str]:
    """A user's shell after `bfn stack up`'s exports; drivers started here take the loopback address."""
    return {**os.environ, **stack["env"], "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _run(stack: dict, argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env=_env(stack), capture_output=True, text=True, timeout=timeout)


def _address(stack: dict) -> list[str]:
    return ["--address", stack["urls"]["ray_dashboard"]]


def _submit(stack: dict, overrides: list[str], *, wait: bool = True, job_id: str | None = None, env=()):
    argv = [BFN, "submit", "train", *overrides, *_address(stack)]
    argv += ["--timeout", "600"] if wait else ["--no-wait"]
    argv += ["--job-id", job_id] if job_id else []
    for item in env:
        argv += ["--env", item]
    return _run(stack, argv, timeout=700)


def ray_nodes(stack: dict) -> list[dict]:
    """``ray.nodes()`` as a driver joining the head sees it (a process of its own, token from the stack)."""
    address = f"127.0.0.1:{stack['ports']['ray']}"
    code = f"import json, ray; ray.init(address='{address}', logging_level='ERROR'); "
    code += "print('NODES ' + json.dumps(ray.nodes()))"
    proc = _run(stack, [sys.executable, "-c", code], timeout=120)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("NODES ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(line[len("NODES ") :])


def _history(stack: dict, run_id: str, key: str) -> list[dict]:
    query = urllib.parse.urlencode({"run_id": run_id, "metric_key": key, "max_results": 25000})
    points = _http_json(f"{stack['urls']['mlflow']}/api/2.0/mlflow/metrics/get-history?{query}").get("metrics", [])
    return sorted(points, key=lambda m: (int(m["timestamp"]), int(m["step"])))


def _run_id(stack: dict, name: str) -> str | None:
    mlflow = stack["urls"]["mlflow"]
    exps = _http_json(f"{mlflow}/api/2.0/mlflow/experiments/search", {"max_results": 1000})
    ids = [e["experiment_id"] for e in exps.get("experiments", [])]
    found = _http_json(
        f"{mlflow}/api/2.0/mlflow/runs/search",
        {"experiment_ids": ids, "filter": f"attributes.run_name = '{name}'"},
    ).get("runs", [])
    return found[0]["info"]["run_id"] if found else None


def _job_logs(stack: dict, job_id: str) -> str:
    """The job's logs through the job SDK in this process (polled every second: no `bfn` start-up each time)."""
    return stack["client"].get_job_logs(job_id) or ""


def _job_status(stack: dict, job_id: str) -> str:
    return str(stack["client"].get_job_status(job_id).value)


class Watch:
    """The elastic run seen from outside: its MLflow points (train/world_size at every log step, with the time
    rank 0 logged it) and its job's log lines."""

    def __init__(self, stack: dict, name: str, job_id: str) -> None:
        self.stack, self.name, self.job_id, self.run_id = stack, name, job_id, None

    def points(self) -> list[dict]:
        self.run_id = self.run_id or _run_id(self.stack, self.name)
        return _history(self.stack, self.run_id, "train/world_size") if self.run_id else []

    def wait_for(self, what: str, ready, timeout: float = WAIT_S) -> list[dict]:
        """Poll until ``ready(points)`` is true; fails naming ``what`` with the job's log tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            points = self.points()
            if points and ready(points):
                return points
            if _job_status(self.stack, self.job_id) in ("FAILED", "SUCCEEDED", "STOPPED"):
                break
            time.sleep(1.0)
        logs = _job_logs(self.stack, self.job_id)
        pytest.fail(f"timed out or ended waiting for {what}; job log tail:\n{logs[-4000:]}")

    def after(self, t_ms: int, points: list[dict]) -> list[dict]:
        return [p for p in points if int(p["timestamp"]) > t_ms]


def _launches(logs: str) -> list[tuple[int, int, int]]:
    """(world size, first step, nodes) of every launch, from rank 0's "world size W from step S" lines."""
    found = re.findall(r"world size (\d+) from step (\d+) on (\d+) node", logs)
    return [(int(w), int(s), int(n)) for w, s, n in found]


def _event(watch: Watch, act) -> dict:
    """Do ``act()`` and wait for the launch it causes; what it cost. A launch is rank 0's "world size W from step S"
    line; the next training step is the launch's first MLflow point past S (logged, so an upper bound by one log
    interval). Steps re-done: the last step logged before that point (by the launch before) minus S."""
    launched = len(_launches(_job_logs(watch.stack, watch.job_id)))
    event_ms = int(time.time() * 1000)
    detail = act() or {}
    new: list[tuple[int, int, int]] = []

    def relaunched(points: list[dict]) -> bool:
        new[:] = _launches(_job_logs(watch.stack, watch.job_id))[launched:]
        return bool(new) and any(_of_launch(p, *new[0]) for p in watch.after(event_ms, points))

    points = watch.wait_for("a new launch and its first step", relaunched)
    world, resumed, nodes = new[0]
    # the old group may still log a step after the event (its ranks fail at their next collective)
    first = next(p for p in watch.after(event_ms, points) if _of_launch(p, world, resumed, nodes))
    last = max(int(p["step"]) for p in points if int(p["timestamp"]) < int(first["timestamp"]))
    return {
        **detail,
        "event_ms": event_ms,
        "seconds_to_next_step": (int(first["timestamp"]) - event_ms) / 1000,
        "last_step_before": last,
        "resumed_from_step": resumed,
        "steps_redone": max(0, last - resumed),
        "world_size_after": world,
        "nodes_after": nodes,
    }


def _of_launch(point: dict, world: int, resumed: int, _nodes: int) -> bool:
    return int(float(point["value"])) == world and int(point["step"]) > resumed


def _steps_per_s(stack: dict, run_id: str) -> dict[int, float]:
    """Median steps/s per world size: train/samples_per_s (the worker's own window timer, data waits in,
    validation and checkpoints out) over the global batch, paired with train/world_size by step and time."""
    sizes = {
        (int(p["step"]), int(p["timestamp"])): int(float(p["value"]))
        for p in _history(stack, run_id, "train/world_size")
    }
    rates: dict[int, list[float]] = {}
    for p in _history(stack, run_id, "train/samples_per_s"):
        world = sizes.get((int(p["step"]), int(p["timestamp"])))
        if world:
            rates.setdefault(world, []).append(float(p["value"]) / BATCH)
    return {w: statistics.median(v[1:] or v) for w, v in sorted(rates.items())}  # a launch's first window: warm-up


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    t0 = time.monotonic()
    state = devstack.up(root, num_cpus=1, object_store_memory=512 * 1024**2, timeout=240, ray_settings=RAY_SETTINGS)
    try:
        state["nodes"] = [devstack.add_node(root, num_cpus=1, resources=WORKER) for _ in range(2)]
        os.environ.pop("RAY_AUTH_TOKEN", None)
        os.environ["RAY_AUTH_TOKEN_PATH"] = state["token_path"]  # this process's job client
        from pipeline.cluster import submit

        state["client"] = submit.connect(state["urls"]["ray_dashboard"], timeout=5)
        state["up_s"] = time.monotonic() - t0
        print(f"multinode stack up (head + 2 nodes): {state['up_s']:.1f}s")
        yield state
    finally:
        report = devstack.down(root)
        print(f"multinode stack down: {report.get('elapsed_s', 0):.1f}s")


@pytest.fixture(scope="module")
def s3_mnist(stack):
    """MNIST shards in the stack's bucket, as on a cluster (`bfn data prepare --out s3://`)."""
    uri = f"s3://{stack['bucket']}/data/mnist"
    proc = _run(stack, [BFN, "data", "prepare", "mnist", "--out", uri], timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return uri


def _common(s3_mnist: str) -> list[str]:
    return [
        "experiment=smoke",
        f"data.uri={s3_mnist}",
        f"data.batch_size={BATCH}",
        "trainer.resources={bfn_worker:1}",
    ]


# --------------------------------------------------------------------------- the cluster


def test_nodes_are_separate_raylets_on_loopback_with_token_auth(stack):
    nodes = [n for n in ray_nodes(stack) if n["Alive"]]
    assert len(nodes) == 3, nodes
    assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
    assert len({n["NodeManagerPort"] for n in nodes}) == 3  # three raylets
    workers = [n for n in nodes if n["Resources"].get("bfn_worker")]
    assert sorted(n["NodeID"] for n in workers) == sorted(node["node_id"] for node in stack["nodes"])
    assert [n for n in nodes if n["Resources"].get("bfn_worker") is None] == [
        n for n in nodes if n["NodeID"] not in {w["node_id"] for w in stack["nodes"]}
    ]
    token = Path(stack["token_path"]).read_text().strip()
    assert devstack.http_status(stack["urls"]["ray_dashboard"] + "/api/jobs/")[0] == 401
    assert devstack.http_status(stack["urls"]["ray_dashboard"] + "/api/jobs/", token)[0] == 200
    from tests.faults import is_loopback, listening_sockets, pids_matching

    pids = pids_matching(marker=f"{devstack.MARKER_ENV}={stack['id']}")
    sockets = listening_sockets(pids)
    assert len(sockets) >= 8 and [s for s in sockets if not is_loopback(s[1])] == [], sockets


def test_a_local_run_folder_is_refused_on_several_nodes_before_any_worker(stack, s3_mnist, tmp_path):
    folder = tmp_path / "local-runs"
    name = f"mn-local-{uuid.uuid4().hex[:6]}"
    proc = _submit(stack, [*_common(s3_mnist), f"run.name={name}", f"run.storage_path={folder}"])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "run.storage_path" in out and "is a local path and this Ray cluster has 3 nodes" in out, out[-3000:]
    assert "train_fn_per_worker" not in out and not list(folder.glob(f"{name}/checkpoint_*"))


def test_one_epoch_visits_every_training_row_once_across_two_nodes(stack, s3_mnist):
    """The real split (driver.data_config: streaming_split of "train") and the workers' own iteration
    (worker._batches, drop_last); 0.0194 of MNIST's 59,400 training rows (1,152) is a multiple of the global batch, so
    nothing is left over and every row must come exactly once."""
    overrides = [*_common(s3_mnist), "data.fraction=0.0194", "trainer.num_workers=2"]
    job = f"bfn-rows-{uuid.uuid4().hex[:6]}"
    from pipeline.cluster import submit

    env, _ = submit.job_env(environ=_env(stack))
    client = stack["client"]
    client.submit_job(
        entrypoint="python tests/integration/multinode_rows.py " + " ".join(overrides),
        runtime_env=submit.build_runtime_env(env, working_dir=REPO),
        submission_id=job,
    )
    with open(os.devnull, "w") as quiet:
        status = submit.follow(client, job, [], timeout=400, poll=1, out=quiet)
    logs = client.get_job_logs(job)
    assert status == "SUCCEEDED", logs[-4000:]
    result = json.loads(next(x for x in logs.splitlines() if x.startswith("ROWS_JSON "))[len("ROWS_JSON ") :])
    ranks = result["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    workers = {n["node_id"] for n in stack["nodes"]}
    assert {r["node"] for r in ranks} == workers  # one rank on each worker node, none on the head
    every = Counter(result["every_row"])
    seen = Counter(d for r in ranks for d in r["rows"])
    assert len(result["every_row"]) % BATCH == 0 and len(result["every_row"]) > 500
    assert seen == every, (sum(seen.values()), sum(every.values()))
    assert not set(ranks[0]["rows"]) & set(ranks[1]["rows"]) or max(every.values()) > 1


# --------------------------------------------------------------------------- the elastic run


@pytest.fixture(scope="module")
def elastic(stack, s3_mnist):
    """The scenario, start to end; returns what happened and when (the tests below check it)."""
    name = f"mn-elastic-{uuid.uuid4().hex[:6]}"
    overrides = [
        *_common(s3_mnist),
        f"run.name={name}",
        "trainer.num_workers=[1,3]",
        "trainer.resize_check_s=5",
        "trainer.max_steps=100000",
        f"trainer.log_every={LOG_EVERY}",
        f"trainer.checkpoint_every={CHECKPOINT_EVERY}",
        "trainer.val_every=100000",
        "trainer.max_failures=4",
    ]
    job = f"bfn-train-{name}"
    sent = _submit(stack, overrides, wait=False, job_id=job, env=JOB_ENV)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    watch, out = Watch(stack, name, job), {"name": name, "job_id": job, "overrides": overrides}
    t0 = time.time()

    # 1. two nodes, two workers
    points = watch.wait_for("world size 2", lambda ps: any(float(p["value"]) == 2 for p in ps), timeout=300)
    out["first_step_s"] = (int(points[0]["timestamp"]) / 1000) - t0
    out["rank_nodes_first"] = _rank_nodes(stack, watch.run_id)
    watch.wait_for("6 steps at world size 2", lambda ps: _steps_at(ps, 2) >= 6)

    # 2. a third node joins: the group grows at the next resize check, from the newest checkpoint
    def grow() -> dict:
        stack["nodes"].append(devstack.add_node(stack["root_dir"], num_cpus=1, resources=WORKER))
        return {"node": stack["nodes"][-1]["node_id"]}

    out["grow"] = _event(watch, grow)
    watch.wait_for("6 steps at world size 3", lambda ps: _steps_at(ps, 3) >= 6)

    # 3. node loss: SIGKILL the first node's raylet
    def lose() -> dict:
        os.kill(devstack.raylet_pid(stack["root_dir"], stack["nodes"][0]["name"]), signal.SIGKILL)
        return {"node": stack["nodes"][0]["node_id"]}

    out["loss"] = _event(watch, lose)
    watch.wait_for("6 steps after the node loss", lambda ps: _steps_at(ps, out["loss"]["world_size_after"]) >= 6)

    # 4. preemption notice: drain the second node with a deadline, as a cloud autoscaler does. `ray drain-node`
    # only announces; the caller reclaims the node: as a cloud would, the test kills it once the workers have acted
    # on the notice (Ray still counts a draining node's resources until then)
    def preempt() -> dict:
        drained, started = stack["nodes"][1], time.monotonic()
        drain = _run(
            stack,
            [
                str(Path(sys.executable).parent / "ray"),
                "drain-node",
                f"--address=127.0.0.1:{stack['ports']['ray']}",
                f"--node-id={drained['node_id']}",
                "--reason=DRAIN_NODE_REASON_PREEMPTION",
                "--reason-message=bfn multinode test",
                "--deadline-remaining-seconds=60",
            ],
            timeout=60,
        )
        assert drain.returncode == 0, drain.stdout + drain.stderr
        deadline = time.monotonic() + WAIT_S
        while "preemption notice for node(s)" not in _job_logs(stack, job) and time.monotonic() < deadline:
            time.sleep(0.5)
        notice_s = time.monotonic() - started
        while "waiting for the preempted node(s) to go" not in _job_logs(stack, job) and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2.0)  # Ray Train's controller registers the checkpoint at its next poll of the workers
        os.kill(devstack.raylet_pid(stack["root_dir"], drained["name"]), signal.SIGKILL)
        return {"node": drained["node_id"], "notice_s": notice_s}

    out["preempt"] = _event(watch, preempt)
    watch.wait_for("4 steps after preemption", lambda ps: _steps_at(ps, out["preempt"]["world_size_after"]) >= 4)

    # 5. bfn jobs stop, bfn jobs logs, and a second bfn submit of the same run that resumes and ends
    stop = _run(stack, [BFN, "jobs", "stop", job, *_address(stack), "--wait", "--timeout", "120"], timeout=200)
    # after the stop: rank 0 logs a step before it reports its checkpoint, so no checkpoint is past this step
    stopped_at = max(int(p["step"]) for p in watch.points())
    out["stop"] = {"rc": stop.returncode, "stdout": stop.stdout, "last_logged_step": stopped_at}
    out["logs"] = _run(stack, [BFN, "jobs", "logs", job, *_address(stack)], timeout=120).stdout  # as a user reads it
    # resumed at a fixed size (trainer.num_workers may change on resume): Ray Train's elastic policy sizes a group
    # from Ray Data's AutoscalingCoordinator, which holds a stopped run's reservation until it expires (180 s,
    # a Ray constant), so an elastic resubmission would wait that long; a fixed group starts at once
    changed = {"trainer.max_steps": f"{stopped_at + 2 * LOG_EVERY}", "trainer.num_workers": "1"}
    changed["trainer.resize_check_s"] = "null"
    resume = _submit(
        stack, [f"{o.split('=')[0]}={changed.get(o.split('=')[0], o.split('=', 1)[1])}" for o in overrides]
    )
    out["resume"] = {"rc": resume.returncode, "out": resume.stdout + resume.stderr}
    out["run_id"] = watch.run_id
    out["points"] = watch.points()
    out["steps_per_s"] = _steps_per_s(stack, watch.run_id)
    out["launches"] = _launches(out["logs"]) + _launches(out["resume"]["out"])
    _write_bench(out)
    return out


def _steps_at(points: list[dict], world: int) -> int:
    """Steps logged at ``world`` workers since that world size last began."""
    run: list[dict] = []
    for point in points:  # in time order: the last unbroken stretch at this world size
        run = [*run, point] if float(point["value"]) == world else []
    return (int(run[-1]["step"]) - int(run[0]["step"])) if run else 0


def _rank_nodes(stack: dict, run_id: str) -> dict:
    run = _http_json(f"{stack['urls']['mlflow']}/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]
    tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
    return json.loads(tags.get("bfn.rank_nodes", "{}"))


def _write_bench(out: dict) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "bench.json").write_text(json.dumps({k: v for k, v in out.items() if k != "logs"}, indent=2))
    rates = out["steps_per_s"]
    base = rates.get(1)
    lines = [
        "| event | world size before -> after | time to the next step (s) | steps re-done | resumed from step |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key, label in (
        ("grow", "node added (grow)"),
        ("loss", "node lost (raylet SIGKILL)"),
        ("preempt", "node drained for preemption"),
    ):
        r = out.get(key)
        if r:
            lines.append(
                f"| {label} | -> {r['world_size_after']} | {r['seconds_to_next_step']:.1f} | {r['steps_redone']} | "
                f"{r['resumed_from_step']} |"
            )
    lines += ["", "| world size | steps/s | ratio to world size 1 |", "| --- | --- | --- |"]
    for world, rate in rates.items():
        lines.append(f"| {world} | {rate:.2f} | {rate / base:.2f} |" if base else f"| {world} | {rate:.2f} | - |")
    (ARTIFACTS / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# --------------------------------------------------------------------------- checks of the elastic run


def test_each_rank_of_two_runs_on_its_own_worker_node(stack, elastic):
    nodes = elastic["rank_nodes_first"]
    workers = {n["node_id"] for n in stack["nodes"][:2]}
    assert len(nodes) == 2 and set(nodes.values()) == workers, nodes


def test_run_grows_when_a_node_joins(elastic):
    grow = elastic["grow"]
    assert grow["world_size_after"] == 3
    assert grow["steps_redone"] <= CHECKPOINT_EVERY + LOG_EVERY


def test_node_loss_continues_from_the_newest_checkpoint(elastic):
    loss = elastic["loss"]
    assert loss["world_size_after"] == 2, loss
    assert loss["steps_redone"] <= CHECKPOINT_EVERY + LOG_EVERY, loss  # at most one interval (+ the unlogged tail)
    assert loss["resumed_from_step"] % CHECKPOINT_EVERY == 0


def test_preemption_checkpoints_at_the_notice_and_resumes_on_the_other_nodes(elastic):
    preempt = elastic["preempt"]
    assert preempt["world_size_after"] == 1, preempt
    assert preempt["steps_redone"] == 0, preempt  # the checkpoint of the notice's log step
    assert "preemption notice for node(s)" in elastic["logs"]
    assert "waiting for the preempted node(s) to go" in elastic["logs"]


def test_one_mlflow_run_one_step_axis_world_size_logged(stack, elastic):
    sizes = [int(float(p["value"])) for p in elastic["points"]]
    assert {1, 2, 3} <= set(sizes), sizes
    assert _run_id(stack, elastic["name"]) == elastic["run_id"]
    run = _find_run(stack, elastic["name"], 0)
    assert run["info"]["status"] == "FINISHED"
    check_run_in_mlflow_and_s3(stack, run)  # the last step validates and writes samples, through S3


def test_jobs_logs_show_rank_0_progress_and_stop_leaves_a_checkpoint_that_submit_resumes(stack, elastic):
    assert elastic["stop"]["rc"] == 0, elastic["stop"]
    assert "STOPPED" in elastic["stop"]["stdout"]
    assert re.search(r"\[bfn\] step \d+/100000 \| loss", elastic["logs"]), elastic["logs"][-2000:]
    resume = elastic["resume"]
    assert resume["rc"] == 0, resume["out"][-4000:]
    resumed = re.search(r"resumed from step (\d+)", resume["out"])
    assert resumed and int(resumed.group(1)) > 0, resume["out"][-3000:]
    assert int(resumed.group(1)) >= elastic["stop"]["last_logged_step"] - CHECKPOINT_EVERY - LOG_EVERY
    keys = _s3_keys(stack, "ray/" + elastic["name"])
    assert any("checkpoint_" in k for k in keys)
