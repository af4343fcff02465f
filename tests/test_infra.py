"""Fast checks of infra/: every file parses, versions agree with pyproject.toml, nothing is exposed,
MLflow servers authenticate, pods are hardened, images are pinned (`bfn submit` / `bfn stack`:
tests/test_submit.py). No Ray, no servers.

(Longer than 500 lines: one check per infra/ file kind, fast and independent.)

What "not exposed" means here: nothing publishes the Ray dashboard/job API or MLflow beyond
127.0.0.1 or the cluster network. On VMs (cluster.yaml) the dashboard binds 127.0.0.1 and the
security group opens no port for it; with Compose, ports are published on 127.0.0.1 only; on
Kubernetes, Services are ClusterIP (no LoadBalancer/NodePort/Ingress/hostNetwork/hostPort) and a
NetworkPolicy limits who may connect. A server listening on all interfaces *inside* a container or
pod is allowed only behind those restrictions (it is what a published port or a Service needs).
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

DOCKERFILE_INSTRUCTIONS = {
    "FROM",
    "ARG",
    "ENV",
    "RUN",
    "COPY",
    "ADD",
    "WORKDIR",
    "USER",
    "EXPOSE",
    "ENTRYPOINT",
    "CMD",
    "LABEL",
    "VOLUME",
    "SHELL",
    "HEALTHCHECK",
    "STOPSIGNAL",
    "ONBUILD",
}
K8S_KINDS_WITHOUT_SPEC = {"ServiceAccount", "ConfigMap", "Secret"}
PUBLIC_KINDS = {"Ingress", "Route", "Gateway", "HTTPRoute"}


# --------------------------------------------------------------------------- helpers


def pinned(name: str) -> str:
    """The exact version pyproject.toml pins for ``name`` (in dependencies or any extra)."""
    meta = PYPROJECT["project"]
    reqs = list(meta["dependencies"])
    for extra in meta.get("optional-dependencies", {}).values():
        reqs += extra
    for req in reqs:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;,\s]+)", req.replace(" ", ""))
        if m and m.group(1).lower() == name.lower():
            return m.group(3)
    raise AssertionError(f"{name} is not pinned with == in pyproject.toml")


def python_minor() -> str:
    spec = PYPROJECT["project"]["requires-python"]
    m = re.search(r">=\s*3\.(\d+)\s*,\s*<\s*3\.(\d+)", spec)
    assert m and int(m.group(2)) == int(m.group(1)) + 1, spec
    return f"3.{m.group(1)}"


def infra_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file())


def yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_docs() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted((INFRA / "kuberay").glob("*.yaml")) + [INFRA / "mlflow" / "k8s.yaml"]:
        out += [(path, d) for d in yaml_docs(path)]
    return out


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined; comments and blanks dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    return out


def dockerfiles() -> list[Path]:
    return sorted(p for p in INFRA.rglob("Dockerfile*") if p.is_file() and not p.name.endswith(".dockerignore"))


def dockerfile_args(path: Path) -> dict[str, str]:
    args = {}
    for word, rest in dockerfile_instructions(path):
        if word == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip().strip('"')
    return args


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def all_images() -> list[tuple[Path, str]]:
    """Every container image reference in infra/ (Dockerfile FROM/COPY --from, YAML image:)."""
    found = []
    for path in dockerfiles():
        args = dockerfile_args(path)
        stages = set()
        for word, rest in dockerfile_instructions(path):
            if word == "FROM":
                parts = expand(rest, args).split()
                parts = [p for p in parts if not p.startswith("--")]
                if parts[0] not in stages:
                    found.append((path, parts[0]))
                if len(parts) >= 3 and parts[1].upper() == "AS":
                    stages.add(parts[2])
            m = re.search(r"--from=(\S+)", rest) if word == "COPY" else None
            if m and expand(m.group(1), args) not in stages:
                found.append((path, expand(m.group(1), args)))
    for path in INFRA.rglob("*.yaml"):

        def walk(node):
            if isinstance(node, dict):
                for k, v in node.items():
                    if k == "image" and isinstance(v, str):
                        found.append((path, v))  # noqa: B023 - consumed immediately
                    else:
                        walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)

        for doc in yaml_docs(path):
            walk(doc)
    return found


# --------------------------------------------------------------------------- infra/: parsing


def test_every_infra_file_parses():
    files = infra_files()
    assert files, "infra/ is empty"
    kinds = set()
    for path in files:
        name = path.name
        if name.endswith((".yaml", ".yml")):
            assert yaml_docs(path), f"{path}: no YAML document"
            kinds.add("yaml")
        elif name.endswith(".json"):
            json.loads(path.read_text())
        elif name.startswith("Dockerfile") and not name.endswith(".dockerignore"):
            instrs = dockerfile_instructions(path)
            assert instrs, path
            for word, _ in instrs:
                assert word in DOCKERFILE_INSTRUCTIONS, f"{path}: unknown instruction {word}"
            first = next(w for w, _ in instrs if w != "ARG")
            assert first == "FROM", f"{path}: first instruction after ARGs is {first}"
            kinds.add("dockerfile")
        elif name.endswith(".md"):
            assert len(path.read_text().strip()) > 200, f"{path} is almost empty"
        elif name in (".gitignore",) or name.endswith(".dockerignore"):
            assert path.read_text().strip(), path
        else:
            pytest.fail(f"{path}: no parser for this kind of file in tests/test_infra.py")
    assert kinds == {"yaml", "dockerfile"}


def test_expected_infra_files_exist():
    expected = "docker/Dockerfile ray/cluster.yaml kuberay/raycluster.yaml kuberay/rayjob.yaml"
    expected += " mlflow/compose.yaml mlflow/k8s.yaml README.md"
    for rel in expected.split():
        assert (INFRA / rel).is_file(), rel


# --------------------------------------------------------------------------- Ray cluster launcher


def test_ray_cluster_config_validates_against_rays_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(config)  # Ray's own check (schema + required fields)
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]


def test_ray_cluster_dashboard_private_and_token_auth():
    config = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    head_cmds = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds
    all_cmds = " ".join(
        config["head_start_ray_commands"]
        + config["worker_start_ray_commands"]
        + config.get("setup_commands", [])
        + config.get("head_setup_commands", [])
    )
    assert "0.0.0.0" not in all_cmds
    for cmds in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token" in c for c in cmds)
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    # the security group opens nothing but what Ray adds itself (intra-cluster + SSH)
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        ranges = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
        ranges += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        public = {"0.0.0.0/0", "::/0"} & set(ranges)
        ports = range(rule.get("FromPort", 0), rule.get("ToPort", 65535) + 1)
        for port in (8265, 6379, 10001, 5000):
            assert not (public and port in ports), f"port {port} open to {public}: {rule}"
    # S3 through instance profiles, never keys
    for node_type in config["available_node_types"].values():
        assert "IamInstanceProfile" in node_type["node_config"]
    text = (INFRA / "ray" / "cluster.yaml").read_text()
    assert not re.search(r"AWS_SECRET_ACCESS_KEY\s*[=:]\s*\S", text)


# --------------------------------------------------------------------------- Kubernetes manifests


def test_k8s_manifests_have_required_fields():
    docs = k8s_docs()
    kinds = {d["kind"] for _, d in docs}
    assert {"RayCluster", "RayJob", "Deployment", "Service", "NetworkPolicy"} <= kinds
    ray_version = pinned("ray")
    for path, doc in docs:
        where = f"{path.name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        assert doc.get("apiVersion"), where
        assert doc.get("kind"), where
        assert doc.get("metadata", {}).get("name"), where
        if doc["kind"] not in K8S_KINDS_WITHOUT_SPEC:
            assert isinstance(doc.get("spec"), dict), where
        if doc["kind"] in ("RayCluster", "RayJob"):
            assert doc["apiVersion"] == "ray.io/v1", where
            cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
            if doc["kind"] == "RayJob":
                assert doc["spec"]["entrypoint"].startswith("python -m pipeline.cli "), where
            assert cluster["rayVersion"] == ray_version, where
            assert cluster["authOptions"]["mode"] == "token", where
            assert cluster["authOptions"].get("secretName"), f"{where}: token not from a Secret"
            head = cluster["headGroupSpec"]
            assert head["serviceType"] == "ClusterIP", where
            assert head["template"]["spec"]["containers"], where
            assert cluster["workerGroupSpecs"], where
            for group in cluster["workerGroupSpecs"]:
                assert group["groupName"] and group["template"]["spec"]["containers"], where
                assert group["minReplicas"] <= group["maxReplicas"], where
                limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
                assert "nvidia.com/gpu" in limits, f"{where}: workers are GPU workers"
            rsp = dict(head.get("rayStartParams", {}))
            assert rsp.get("dashboard-host", "") != "0.0.0.0", where
        if doc["kind"] == "Deployment":
            labels = doc["spec"]["template"]["metadata"]["labels"]
            for k, v in doc["spec"]["selector"]["matchLabels"].items():
                assert labels.get(k) == v, f"{where}: selector does not match the pod labels"
        if doc["kind"] == "Service":
            assert doc["spec"].get("selector") and doc["spec"].get("ports"), where


def test_k8s_nothing_public():
    for path, doc in k8s_docs():
        where = f"{path.name}:{doc['kind']}/{doc['metadata']['name']}"
        assert doc["kind"] not in PUBLIC_KINDS, where
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", where
            assert not doc["spec"].get("externalIPs"), where
        text = yaml.safe_dump(doc)
        assert "hostNetwork: true" not in text, where
        assert "hostPort:" not in text, where
        assert "LoadBalancer" not in text and "NodePort" not in text, where
    # every namespace-local server is behind a NetworkPolicy
    policies = [d for _, d in k8s_docs() if d["kind"] == "NetworkPolicy"]
    covered = [
        p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for p in policies if p["spec"]["podSelector"]
    ]  # the default-deny policy selects every pod, so it has no name here
    assert {"bfn-ray", "bfn-rayjob", "bfn-mlflow"} <= set(covered)


# --------------------------------------------------------------------------- MLflow (compose)


def test_compose_ports_on_loopback_and_no_literal_credentials():
    compose = yaml.safe_load((INFRA / "mlflow" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "mlflow"} <= set(services)
    assert "ports" not in services["postgres"], "PostgreSQL must not be published"
    for name, svc in services.items():
        assert svc.get("network_mode") != "host", name
        for port in svc.get("ports", []):
            host = str(port).rsplit(":", 2)[0]
            assert host in ("127.0.0.1", "${MLFLOW_BIND_ADDRESS:-127.0.0.1}"), f"{name}: {port}"
    command = " ".join(services["mlflow"]["command"])
    assert "postgresql://" in command and "--artifacts-destination" in command
    assert not re.search(r"postgresql://[^@\s/]+:[^@\s]+@", command), "password in the URI"
    pg_env = services["postgres"]["environment"]
    assert "POSTGRES_PASSWORD" not in pg_env and pg_env["POSTGRES_PASSWORD_FILE"]
    for key, value in services["mlflow"]["environment"].items():
        if any(w in key for w in ("SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY")):
            assert str(value).startswith("${"), f"{key} is a literal"


def test_no_secrets_or_public_binds_anywhere_in_infra():
    for path in infra_files():
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"{path}: AWS access key id"
        assert "--dashboard-host=0.0.0.0" not in text, path
        assert not re.search(r"dashboard-host:\s*['\"]?0\.0\.0\.0", text), path
        assert not re.search(r"auth_token\s*[:=]\s*['\"]?[0-9a-f]{32,}", text), f"{path}: token"
        if path.name in ("cluster.yaml", "Dockerfile"):
            assert "0.0.0.0" not in text.replace("0.0.0.0/0", ""), path


# --------------------------------------------------------------------------- MLflow auth, pods


def mlflow_server_commands() -> list[tuple[Path, str]]:
    """Every `mlflow server` command in infra/: YAML strings (k8s and compose commands) and
    Dockerfile instructions, comments left out."""
    found = []

    def walk(path, node):
        if isinstance(node, dict):
            for value in node.values():
                walk(path, value)
        elif isinstance(node, list):
            joined = " ".join(v for v in node if isinstance(v, str))
            if "mlflow server" in joined:
                found.append((path, joined))
            for value in node:
                if not isinstance(value, str):
                    walk(path, value)
        elif isinstance(node, str) and "mlflow server" in node:
            found.append((path, node))

    for path in INFRA.rglob("*.yaml"):
        for doc in yaml_docs(path):
            walk(path, doc)
    for path in dockerfiles():
        found += [(path, rest) for _, rest in dockerfile_instructions(path) if "mlflow server" in rest]
    return found


def test_every_mlflow_server_uses_basic_auth_with_secrets_from_secrets():
    commands = mlflow_server_commands()
    assert {p.name for p, _ in commands} == {"compose.yaml", "k8s.yaml"}, commands
    for path, command in commands:
        assert "--app-name basic-auth" in command, f"{path}: {command}"
    # compose: secret key and admin password read from Docker secrets at start
    compose = yaml.safe_load((INFRA / "mlflow" / "compose.yaml").read_text())
    mlflow = compose["services"]["mlflow"]
    command = " ".join(mlflow["command"])
    for variable, secret in (
        ("MLFLOW_FLASK_SERVER_SECRET_KEY", "flask_secret_key"),
        ("MLFLOW_AUTH_ADMIN_PASSWORD", "admin_password"),
    ):
        assert f'export {variable}="$$(cat /run/secrets/{secret})"' in command
        assert secret in mlflow["secrets"] and compose["secrets"][secret]["file"].startswith("./secrets/")
        assert variable not in mlflow["environment"]
    assert mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow-auth/basic_auth.ini"
    # k8s: both from the Secret bfn-mlflow-auth
    deployment = next(d for _, d in k8s_docs() if d["kind"] == "Deployment" and d["metadata"]["name"] == "bfn-mlflow")
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    for variable in ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        assert env[variable]["valueFrom"]["secretKeyRef"]["name"] == "bfn-mlflow-auth", variable
    # no default or literal admin password anywhere; auth configs name no password
    for path in infra_files():
        text = path.read_text()
        assert "password1234" not in text, path
        assert not re.search(r"^\s*admin_password\s*=\s*\S", text, re.M), f"{path}: literal admin_password"
    assert "mlflow[auth]==" in (INFRA / "mlflow" / "Dockerfile").read_text()  # Flask-WTF for the auth app


def pod_specs() -> list[tuple[str, dict, bool]]:
    """(where, pod spec, may mount the API token) of every pod template in the k8s manifests."""
    out = []
    for path, doc in k8s_docs():
        name = f"{path.name}:{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "Deployment":
            out.append((name, doc["spec"]["template"]["spec"], False))
        if doc["kind"] in ("RayCluster", "RayJob"):
            cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
            autoscaler = bool(cluster.get("enableInTreeAutoscaling"))  # runs in the head pod, calls the API
            out.append((f"{name}/head", cluster["headGroupSpec"]["template"]["spec"], autoscaler))
            out += [(f"{name}/{g['groupName']}", g["template"]["spec"], False) for g in cluster["workerGroupSpecs"]]
    return out


def test_pods_are_hardened():
    specs = pod_specs()
    assert len(specs) == 5
    for where, spec, may_mount in specs:
        assert spec.get("automountServiceAccountToken") is may_mount, where
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["capabilities"]["drop"] == ["ALL"] and not context["capabilities"].get("add"), where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context.get("runAsNonRoot", spec["securityContext"]["runAsNonRoot"]) is True, where
            assert context["seccompProfile"]["type"] == "RuntimeDefault", where
    for _, doc in k8s_docs():
        if doc["kind"] == "ServiceAccount":
            assert doc["automountServiceAccountToken"] is False, doc["metadata"]["name"]
        if doc["kind"] == "RayCluster" and doc["spec"].get("enableInTreeAutoscaling"):
            autoscaler = doc["spec"]["autoscalerOptions"]["securityContext"]
            assert autoscaler["capabilities"]["drop"] == ["ALL"]
            assert autoscaler["seccompProfile"]["type"] == "RuntimeDefault"


def test_network_policies_deny_by_default_and_admit_ray_pods_only():
    policies = {d["metadata"]["name"]: d["spec"] for _, d in k8s_docs() if d["kind"] == "NetworkPolicy"}
    deny = policies["bfn-default-deny-ingress"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}
    for name, spec in policies.items():
        for rule in spec.get("ingress", []):
            for peer in rule["from"]:
                if "podSelector" not in peer:
                    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kuberay-system"}
                    continue
                selector = peer["podSelector"]
                keys = set(selector.get("matchLabels", {})) | {e["key"] for e in selector.get("matchExpressions", [])}
                # the project's label AND one that KubeRay sets on the pods it creates
                assert "app.kubernetes.io/name" in keys and any(k.startswith("ray.io/") for k in keys), (name, peer)
    assert policies["bfn-mlflow-ingress"]["ingress"][0]["ports"] == [{"port": 5000, "protocol": "TCP"}]


# images still pinned by tag only, and why: our own images get their digest when they are pushed
# (deploy time); for the two base images no digest could be confirmed here (no registry access).
UNPINNED_IMAGES = {
    "nvidia/cuda:13.0.2-base-ubuntu24.04",
    "ghcr.io/astral-sh/uv:0.13.8",
    "registry.example.com/bfn/bfn-ray:0.1.0-py3.11-ray2.60.0-torch2.13.0-cu130",
    "registry.example.com/bfn/bfn-mlflow:3.17.2",
}


def test_images_without_a_digest_are_exactly_the_documented_ones():
    """Flags every image pinned by tag only; the known ones are listed above with the reason.
    Pinning one by digest (`docker buildx imagetools inspect IMAGE`) means removing it here."""
    unpinned = {image for _, image in all_images() if not re.search(r"@sha256:[0-9a-f]{64}$", image)}
    assert unpinned == UNPINNED_IMAGES
    for path, image in all_images():
        if "@sha256:" in image:
            assert ":" in image.split("@")[0], f"{path}: {image} keeps its tag next to the digest"


# --------------------------------------------------------------------------- versions


def test_images_pinned_and_versions_consistent_with_pyproject():
    ray_v, mlflow_v, torch_v, py = pinned("ray"), pinned("mlflow"), pinned("torch"), python_minor()
    assert (ray_v, mlflow_v, torch_v, py) == ("2.60.0", "3.17.2", "2.13.0", "3.11")
    images = all_images()
    assert images
    for path, image in images:
        name, _, tag = image.split("@")[0].rpartition(":")
        assert name and tag and "/" not in tag, f"{path}: image {image} has no tag"
        assert tag != "latest" and "$" not in tag, f"{path}: image {image} is not pinned"
    bfn_tags = {img.rpartition(":")[2] for _, img in images if "/bfn-ray:" in img}
    assert len(bfn_tags) == 1, f"one bfn-ray image tag everywhere, got {bfn_tags}"
    (tag,) = bfn_tags
    assert f"ray{ray_v}" in tag and f"torch{torch_v}" in tag and f"py{py}" in tag, tag
    assert tag.startswith(PYPROJECT["project"]["version"]), tag
    for _, img in images:
        if "/bfn-mlflow:" in img:
            assert img.endswith(f":{mlflow_v}"), img

    args = dockerfile_args(INFRA / "docker" / "Dockerfile")
    assert args["RAY_VERSION"] == ray_v
    assert args["MLFLOW_VERSION"] == mlflow_v
    assert args["TORCH_VERSION"] == torch_v
    assert args["PYTHON_VERSION"] == py
    assert dockerfile_args(INFRA / "mlflow" / "Dockerfile")["MLFLOW_VERSION"] == mlflow_v
    # every `pkg==version` in a Dockerfile agrees with pyproject.toml where both pin it
    for path in dockerfiles():
        text = expand(path.read_text(), dockerfile_args(path))
        for name, version in re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^"\s]+)"', text):
            try:
                expected = pinned(name)
            except AssertionError:
                continue
            assert version == expected, f"{path}: {name}=={version}, pyproject pins {expected}"
    # CUDA base image: a full x.y.z version and torch's CUDA major (13) for torch 2.13.0
    cuda = args["CUDA_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-[a-z]+-ubuntu\d\d\.\d\d", cuda), cuda
    raycluster = yaml_docs(INFRA / "kuberay" / "raycluster.yaml")
    assert any(d.get("spec", {}).get("rayVersion") == ray_v for d in raycluster)


def test_infra_readme_walks_laptop_to_cluster():
    text = (INFRA / "README.md").read_text()
    for needle in (
        "bfn stack up",
        "bfn submit",
        "ray up",
        "ray dashboard",
        "RAY_AUTH_TOKEN",
        "kubectl",
        "bfn jobs logs",
        "bfn stack down",
    ):
        assert needle in text, needle
