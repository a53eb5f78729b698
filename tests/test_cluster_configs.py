"""The shipped cluster configs validate, and each class of mistake fails naming the file, line and key.

Expected line numbers are found by searching the mutated text, not taken from the validator; expected
resources come from the YAML parsed here. No cloud, no network, no cluster.
"""

import json
import re
import shutil
import socket
from pathlib import Path

import pytest
import yaml

from weakseg.errors import UserError
from weakseg.cluster.local import free_port
from weakseg.cluster.validate import validate_cluster_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
SHIPPED = ["aws.yaml", "gcp.yaml", "onprem.yaml", "kuberay.yaml"]


def line_of(text: str, needle: str, after: str | None = None) -> int:
    """1-based number of the first line containing `needle` (after the first line containing `after`)."""
    lines = text.splitlines()
    start = 0
    if after is not None:
        start = next(i for i, ln in enumerate(lines) if after in ln) + 1
    return next(i for i in range(start, len(lines)) if needle in lines[i]) + 1


def mutate(tmp_path: Path, name: str, old: str, new: str) -> tuple[Path, str]:
    text = (CLUSTER / name).read_text()
    assert old in text, f"{name} no longer contains {old!r}: update this test"
    text = text.replace(old, new, 1)
    path = tmp_path / name
    path.write_text(text)
    return path, text


def fails(path: Path, line: int, key: str, message: str) -> None:
    """The error names path:line: key: (key and message are regular expressions)."""
    with pytest.raises(UserError) as e:
        validate_cluster_config(path)
    text = str(e.value)
    assert re.match(rf"{re.escape(str(path))}:{line}: {key}: ", text), text
    assert re.search(message, text), text


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Validation must work offline: any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("validate_cluster_config tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_configs_validate_with_their_declared_resources(name: str):
    raw = yaml.safe_load((CLUSTER / name).read_text())
    summary = validate_cluster_config(CLUSTER / name)
    assert "\n" not in summary
    assert summary.startswith(f"{CLUSTER / name}: {raw['provider']['type']} ")
    machine = "InstanceType" if raw["provider"]["type"] == "aws" else "machineType"
    for node_type, nt in raw["available_node_types"].items():
        res = nt["resources"]
        assert f"{node_type} {nt['node_config'][machine]} {{CPU: {res['CPU']}, GPU: {res['GPU']}}}" in summary
    # Something must be able to run a one-GPU trial, or `weakseg search` would refuse to start.
    assert any(nt["resources"]["GPU"] >= 1 and nt["max_workers"] >= 1 for nt in raw["available_node_types"].values())
    assert "auth token" in summary and "dashboard 127.0.0.1:8265" in summary and "mlflow 127.0.0.1:5000" in summary


def test_onprem_config_validates_with_start_command_resources():
    summary = validate_cluster_config(CLUSTER / "onprem.yaml")
    raw = yaml.safe_load((CLUSTER / "onprem.yaml").read_text())
    worker = raw["worker_start_ray_commands"][-1]
    cpus, gpus = (int(re.search(rf"--num-{k}=(\d+)", worker).group(1)) for k in ("cpus", "gpus"))
    assert f"{len(raw['provider']['worker_ips'])} workers {{CPU: {cpus}, GPU: {gpus}}}" in summary
    assert "auth token" in summary and "mlflow 127.0.0.1:5000" in summary


def test_kuberay_manifest_validates():
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text()))
    rc = next(d for d in docs if d["kind"] == "RayCluster")
    group = rc["spec"]["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    summary = validate_cluster_config(CLUSTER / "kuberay.yaml")
    assert summary.startswith(f"{CLUSTER / 'kuberay.yaml'}: kuberay RayCluster {rc['metadata']['name']} ")
    assert (f"{group['groupName']} {{CPU: {float(limits['cpu']):g}, GPU: {limits['nvidia.com/gpu']}}} "
            f"x{group['minReplicas']}-{group['maxReplicas']}") in summary
    assert "auth token" in summary and "dashboard 127.0.0.1" in summary


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_hold_placeholders_not_credentials(name: str):
    text = (CLUSTER / name).read_text()
    assert "<your-" in text
    assert not re.search(r"AKIA[0-9A-Z]{16}|BEGIN [A-Z ]*PRIVATE KEY|0\.0\.0\.0/0", text)


# ---------------------------------------------------------------------------- launcher mistakes


def test_top_level_typo_suggests_the_key(tmp_path: Path):
    path, text = mutate(tmp_path, "aws.yaml", "\nsetup_commands:", "\nsetup_comands:")
    fails(path, line_of(text, "setup_comands:"), "setup_comands", r"unknown key; did you mean setup_commands\?")


def test_node_type_typo_suggests_the_key(tmp_path: Path):
    path, text = mutate(tmp_path, "aws.yaml", "    min_workers: 0\n    max_workers: 8",
                        "    min_wokers: 0\n    max_workers: 8")
    fails(path, line_of(text, "min_wokers"), "available_node_types.gpu_1x_a10g.min_wokers",
          r"did you mean min_workers\?")


def test_provider_typo_suggests_the_key(tmp_path: Path):
    path, text = mutate(tmp_path, "gcp.yaml", "  availability_zone:", "  availabilty_zone:")
    fails(path, line_of(text, "availabilty_zone"), "provider.availabilty_zone", r"did you mean availability_zone\?")


def test_node_type_without_resources(tmp_path: Path):
    path, text = mutate(tmp_path, "aws.yaml", '  gpu_1x_a10g:\n    resources: {"CPU": 8, "GPU": 1}\n',
                        "  gpu_1x_a10g:\n")
    fails(path, line_of(text, "gpu_1x_a10g:"), "available_node_types.gpu_1x_a10g", r"needs explicit resources")


def test_node_type_without_gpu_count(tmp_path: Path):
    path, text = mutate(tmp_path, "aws.yaml", '{"CPU": 8, "GPU": 1}', '{"CPU": 8}')
    fails(path, line_of(text, '{"CPU": 8}'), "available_node_types.gpu_1x_a10g.resources",
          r"declare GPU explicitly")


def test_wrong_max_workers_type(tmp_path: Path):
    path, text = mutate(tmp_path, "aws.yaml", "\nmax_workers: 8", "\nmax_workers: eight")
    fails(path, line_of(text, "max_workers: eight"), "max_workers", r"'eight' is not of type 'integer'")


def test_ray_preparation_errors_are_reported(tmp_path: Path):
    """Ray's own validate_config: head_node_type must name a node type."""
    path, text = mutate(tmp_path, "aws.yaml", "head_node_type: head", "head_node_type: hed")
    fails(path, line_of(text, "head_node_type: hed"), "head_node_type", r"must be one of `available_node_types`")


def test_min_workers_above_max_workers(tmp_path: Path):
    path, text = mutate(tmp_path, "aws.yaml", "    min_workers: 0\n    max_workers: 8",
                        "    min_workers: 9\n    max_workers: 8")
    fails(path, line_of(text, "max_workers: 8"), "max_workers", r"smaller than the sum of `min_workers`")


def test_missing_ray_auth_mode(tmp_path: Path):
    path, text = mutate(tmp_path, "aws.yaml", "    RAY_AUTH_MODE=token\n    ray start --address",
                        "    ray start --address")
    fails(path, line_of(text, "- >-", after="worker_start_ray_commands:"), r"worker_start_ray_commands\[1\]",
          r"without RAY_AUTH_MODE")


def test_auth_modes_must_agree(tmp_path: Path):
    path, text = mutate(tmp_path, "gcp.yaml", "    RAY_AUTH_MODE=token\n    ray start --address",
                        "    RAY_AUTH_MODE=disabled\n    ray start --address")
    fails(path, line_of(text, "worker_start_ray_commands:"), "worker_start_ray_commands", r"differs")


def test_token_must_reach_the_nodes(tmp_path: Path):
    path, text = mutate(tmp_path, "aws.yaml", '  "~/.ray/auth_token": "~/.ray/auth_token"\n', "")
    fails(path, line_of(text, "file_mounts:"), "file_mounts", r"no token reaches the nodes")


def test_dashboard_bound_to_all_interfaces(tmp_path: Path):
    path, text = mutate(tmp_path, "aws.yaml", "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")
    fails(path, line_of(text, "- >-", after="head_start_ray_commands:"), r"head_start_ray_commands\[1\]",
          r"--dashboard-host=0.0.0.0 exposes the dashboard")


def test_dashboard_host_must_be_explicit(tmp_path: Path):
    path, text = mutate(tmp_path, "gcp.yaml", "--dashboard-host=127.0.0.1 ", "")
    fails(path, line_of(text, "- >-", after="head_start_ray_commands:"), r"head_start_ray_commands\[1\]",
          r"set --dashboard-host=127.0.0.1 explicitly")


def test_mlflow_bound_to_all_interfaces(tmp_path: Path):
    path, text = mutate(tmp_path, "aws.yaml", "mlflow server --host 127.0.0.1", "mlflow server --host 0.0.0.0")
    fails(path, line_of(text, "nohup mlflow server") - 1, r"head_start_ray_commands\[3\]", r"--host 0.0.0.0 exposes")


def test_security_rule_open_to_the_internet(tmp_path: Path):
    path, text = mutate(tmp_path, "aws.yaml", "  cache_stopped_nodes: false\n",
                        "  cache_stopped_nodes: false\n  security_group:\n    GroupName: weakseg\n"
                        "    IpPermissions:\n      - {IpProtocol: tcp, FromPort: 8265, ToPort: 8265, "
                        "IpRanges: [{CidrIp: 0.0.0.0/0}]}\n")
    fails(path, line_of(text, "FromPort: 8265"), r"provider.security_group.IpPermissions\[0\]", r"0\.0\.0\.0/0")


def test_aws_node_type_without_own_security_group(tmp_path: Path):
    path, text = mutate(tmp_path, "aws.yaml", "      SecurityGroupIds: [<your-security-group-id>]\n", "")
    fails(path, line_of(text, "node_config:"), "available_node_types.head.node_config", r"SSH from 0\.0\.0\.0/0")


def test_gcp_gpu_count_must_match_the_machine(tmp_path: Path):
    path, text = mutate(tmp_path, "gcp.yaml", '{"CPU": 12, "GPU": 1}', '{"CPU": 12, "GPU": 2}')
    fails(path, line_of(text, '"GPU": 2'), "available_node_types.gpu_1x_a100.resources.GPU",
          r"2 declared but the node has 1 GPU")


def test_gcp_gpu_vm_needs_terminate_on_maintenance(tmp_path: Path):
    path, text = mutate(tmp_path, "gcp.yaml", "{onHostMaintenance: TERMINATE, automaticRestart: true}",
                        "{automaticRestart: true}")
    fails(path, line_of(text, "scheduling: {automaticRestart"), "available_node_types.gpu_1x_a100.node_config.scheduling",
          r"onHostMaintenance: TERMINATE")


def test_gcp_node_type_needs_own_subnetwork(tmp_path: Path):
    text = (CLUSTER / "gcp.yaml").read_text()
    start = text.index("      networkInterfaces:")
    end = text.index("      tags:", start)
    path = tmp_path / "gcp.yaml"
    path.write_text(text[:start] + text[end:])
    fails(path, line_of(text, "node_config:"), "available_node_types.head.node_config", r"default-allow-ssh")


def test_onprem_workers_must_declare_gpus(tmp_path: Path):
    path, text = mutate(tmp_path, "onprem.yaml", "--num-cpus=16 --num-gpus=2", "--num-cpus=16")
    fails(path, line_of(text, "- >-", after="worker_start_ray_commands:"), r"worker_start_ray_commands\[1\]",
          r"explicit --num-gpus")


def test_onprem_rejects_node_types(tmp_path: Path):
    """Ray's local provider refuses available_node_types; its message is passed on with the key."""
    path, text = mutate(tmp_path, "onprem.yaml", "idle_timeout_minutes: 10",
                        "idle_timeout_minutes: 10\navailable_node_types: {w: {resources: {CPU: 1}, node_config: {}}}")
    fails(path, line_of(text, "available_node_types:"), "available_node_types", r"not supported for on-premise")


def test_malformed_yaml_names_the_line(tmp_path: Path):
    path, text = mutate(tmp_path, "aws.yaml", "  type: aws\n", "  type: [aws\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:\d+: malformed YAML"):
        validate_cluster_config(path)


def test_unreadable_and_unknown_files(tmp_path: Path):
    with pytest.raises(UserError, match=r"nope\.yaml: cannot read"):
        validate_cluster_config(tmp_path / "nope.yaml")
    p = tmp_path / "x.yaml"
    p.write_text("cluster_name: x\nprovidr: {type: aws}\n")
    fails(p, 2, "providr", r"did you mean provider\?")


# ---------------------------------------------------------------------------- KubeRay mistakes


def test_kuberay_gpu_group_without_gpu_limit(tmp_path: Path):
    path, text = mutate(tmp_path, "kuberay.yaml", "limits: {cpu: \"8\", memory: 48Gi, nvidia.com/gpu: 1}",
                        "limits: {cpu: \"8\", memory: 48Gi}")
    fails(path, line_of(text, 'limits: {cpu: "8", memory: 48Gi}'),
          r"spec.workerGroupSpecs\[0\].template.spec.containers\[0\].resources.limits", r"no nvidia.com/gpu limit")


def test_kuberay_gpu_limit_must_match_num_gpus(tmp_path: Path):
    path, text = mutate(tmp_path, "kuberay.yaml", 'num-gpus: "1"', 'num-gpus: "2"')
    fails(path, line_of(text, 'limits: {cpu: "8", memory: 48Gi, nvidia.com/gpu: 1}'),
          r"spec.workerGroupSpecs\[0\].template.spec.containers\[0\].resources.limits.nvidia.com/gpu",
          r"rayStartParams num-gpus is 2")


def test_kuberay_old_api_version(tmp_path: Path):
    path, text = mutate(tmp_path, "kuberay.yaml", "apiVersion: ray.io/v1\n", "apiVersion: ray.io/v1alpha1\n")
    fails(path, line_of(text, "ray.io/v1alpha1"), "apiVersion", r"ray\.io/v1")


def test_kuberay_start_params_must_be_strings(tmp_path: Path):
    path, text = mutate(tmp_path, "kuberay.yaml", 'num-gpus: "1"', "num-gpus: 1")
    fails(path, line_of(text, "num-gpus: 1"), r"spec.workerGroupSpecs\[0\].rayStartParams.num-gpus",
          r"must be quoted")


def test_kuberay_without_auth_options(tmp_path: Path):
    text = (CLUSTER / "kuberay.yaml").read_text()
    block = "  authOptions:\n    mode: token\n    secretName: weakseg-ray-token\n"
    assert text.count(block) == 1
    path = tmp_path / "kuberay.yaml"
    path.write_text(text.replace(block, ""))
    new = path.read_text()
    fails(path, line_of(new, "- name: ray-head"),
          r"spec.headGroupSpec.template.spec.containers\[0\]", r"spec.authOptions")


def test_kuberay_exposed_head_and_dashboard(tmp_path: Path):
    path, text = mutate(tmp_path, "kuberay.yaml", "serviceType: ClusterIP", "serviceType: LoadBalancer")
    fails(path, line_of(text, "serviceType: LoadBalancer"), "spec.headGroupSpec.serviceType", r"kubectl port-forward")
    path, text = mutate(tmp_path, "kuberay.yaml", 'dashboard-host: "127.0.0.1"', 'dashboard-host: "0.0.0.0"')
    fails(path, line_of(text, "dashboard-host"), "spec.headGroupSpec.rayStartParams.dashboard-host", r"exposes")


def test_kuberay_typo_in_spec(tmp_path: Path):
    path, text = mutate(tmp_path, "kuberay.yaml", "  workerGroupSpecs:", "  workerGroupSpec:")
    fails(path, line_of(text, "workerGroupSpec:"), "spec.workerGroupSpec", r"did you mean workerGroupSpecs\?")


def test_kuberay_mlflow_sidecar_bound_to_all_interfaces(tmp_path: Path):
    path, text = mutate(tmp_path, "kuberay.yaml", "--host, 127.0.0.1", "--host, 0.0.0.0")
    fails(path, line_of(text, "- name: mlflow"), r"spec.headGroupSpec.template.spec.containers\[1\]",
          r"127\.0\.0\.1")


def test_free_port_is_bindable_and_outside_the_ephemeral_range():
    port = free_port()
    assert 20000 <= port < 32000
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_cloud_config_must_declare_node_types(tmp_path: Path):
    p = tmp_path / "bare.yaml"
    p.write_text("cluster_name: x\nprovider: {type: aws, region: us-west-2}\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(p))}:1: \(top level\): declare available_node_types"):
        validate_cluster_config(p)


def test_local_cluster_refuses_a_root_too_long_for_ray_sockets(tmp_path: Path):
    from weakseg.cluster.local import LocalCluster

    root = tmp_path / ("x" * 80)
    with pytest.raises(UserError, match="path too long"):
        LocalCluster(root).start()
    assert not root.exists()  # refused before creating anything or starting a process


# ---------------------------------------------------------------------------------------------- issue 11

REPO = CLUSTER.parent
LAUNCHER = ["aws.yaml", "gcp.yaml", "onprem.yaml"]
needs_rsync = pytest.mark.skipif(shutil.which("rsync") is None, reason="no rsync on this machine (apt install rsync)")


def package_modules() -> int:
    """weakseg's modules, counted from the source tree (the package itself and every .py but __main__)."""
    files = [p for p in (REPO / "weakseg").rglob("*.py") if "__pycache__" not in p.parts and p.name != "__main__.py"]
    return len(files)


def test_launcher_configs_share_setup_and_sync_rules():
    cfgs = {n: yaml.safe_load((CLUSTER / n).read_text()) for n in LAUNCHER}
    for key in ("file_mounts", "rsync_exclude", "rsync_filter", "worker_setup_commands"):
        assert len({json.dumps(c.get(key)) for c in cfgs.values()}) == 1, key
    for name, c in cfgs.items():
        setup = [cmd for cmd in c["setup_commands"] if "cluster/setup.sh" in cmd]
        assert len(setup) == 1 and setup[0].startswith("bash ~/weakseg/cluster/setup.sh"), (name, setup)
        assert not any(re.search(r"pip install|==\d", cmd) for cmd in c["setup_commands"]), name  # pins live in one file
    for excl in cfgs["aws.yaml"]["rsync_exclude"]:
        assert excl.startswith("/") or "/" not in excl and excl not in ("data", "runs", "results", ".venv"), excl
    assert "constraints.txt" in (CLUSTER / "setup.sh").read_text()
    assert "-c /home/ray/weakseg/cluster/constraints.txt" in (CLUSTER / "Dockerfile").read_text()


@needs_rsync
@pytest.mark.parametrize("name", LAUNCHER)
def test_shipped_config_syncs_a_checkout_that_imports(name: str):
    summary = validate_cluster_config(CLUSTER / name)
    assert f"synced checkout imports ({package_modules()} modules)" in summary, summary


@needs_rsync
def test_unanchored_exclude_that_drops_the_package_data_module(tmp_path: Path):
    path, text = mutate(tmp_path, "onprem.yaml", 'rsync_exclude: ["/.venv", "/data", ', 'rsync_exclude: ["/.venv", "data", ')
    with pytest.raises(UserError) as e:
        validate_cluster_config(path, checkout=REPO)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{line_of(text, 'rsync_exclude:')}: rsync_exclude: "), msg
    assert re.search(r"loses \d+ file\(s\) of the package, e.g. weakseg/data/", msg), msg


@needs_rsync
def test_filter_file_that_deletes_code(tmp_path: Path):
    """An rsync_filter file (Ray's `dir-merge,- FILE`) with a pattern that drops a module: the import check sees it."""
    checkout = tmp_path / "co"
    shutil.copytree(REPO / "weakseg", checkout / "weakseg", ignore=shutil.ignore_patterns("__pycache__"))
    (checkout / "pyproject.toml").write_text("")
    (checkout / ".syncignore").write_text("metrics.py\n")
    path, text = mutate(tmp_path, "onprem.yaml", "rsync_exclude: [", "rsync_filter: [.syncignore]\nrsync_exclude: [")
    with pytest.raises(UserError, match=r"loses 1 file\(s\) of the package, e.g. weakseg/metrics.py"):
        validate_cluster_config(path, checkout=checkout)


def test_placeholders_are_listed_and_fail_with_strict(tmp_path: Path):
    text = (CLUSTER / "onprem.yaml").read_text()
    code = [ln.split(" #", 1)[0] for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    count = sum(len(re.findall(r"<your-[a-z0-9-]+>", ln)) for ln in code)
    assert count == 5  # head, two workers, user, key
    path = tmp_path / "onprem.yaml"
    path.write_text(text)
    assert f"; {count} placeholder(s) to fill before launching" in validate_cluster_config(path)
    with pytest.raises(UserError) as e:
        validate_cluster_config(path, strict=True)
    assert str(e.value) == (f"{path}:{line_of(text, 'head_ip: <your-head-host>')}: <your-head-host> is a "
                            f"placeholder: fill it in before launching (and {count - 1} more)")
    filled = re.sub(r"<your-([a-z0-9-]+)>", r"\1", text)
    path.write_text(filled)
    assert validate_cluster_config(path, strict=True).endswith("; no placeholders")


def test_cli_strict_flag(tmp_path: Path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "weakseg", "cluster", "validate", "--strict", str(CLUSTER / "kuberay.yaml")],
                       capture_output=True, text=True, timeout=120)
    text = (CLUSTER / "kuberay.yaml").read_text()
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"kuberay.yaml:{line_of(text, '<your-rwx-storage-class>')}: <your-rwx-storage-class> is a placeholder" \
        in r.stderr


def test_aws_latest_dlami_is_refused(tmp_path: Path):
    ssm = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"
    path, text = mutate(tmp_path, "aws.yaml", f"ImageId: {ssm}", "ImageId: latest_dlami")
    fails(path, line_of(text, "ImageId: latest_dlami"),
          r"available_node_types.head.node_config.ImageId", r"Ubuntu 18.04")


def test_gcp_image_with_an_old_driver_is_refused(tmp_path: Path):
    path, text = mutate(tmp_path, "gcp.yaml", "ubuntu-2204-nvidia-580", "ubuntu-2204-nvidia-550")
    fails(path, line_of(text, "nvidia-550"), r"available_node_types.head.node_config.disks\[0\].initializeParams.sourceImage",
          r"driver >= 580")


def test_docker_image_of_another_ray_is_refused(tmp_path: Path):
    path, text = mutate(tmp_path, "aws.yaml", "head_node_type: head\n",
                        "head_node_type: head\ndocker: {image: rayproject/ray:2.9.0-py310-gpu, container_name: ray}\n")
    fails(path, line_of(text, "docker:"), r"docker.image", r"Ray 2\.60\.0")


def test_kuberay_network_policy_from_kuberay_samples_passes(tmp_path: Path):
    path, text = mutate(tmp_path, "kuberay.yaml", "  enableInTreeAutoscaling: true\n",
                        "  enableInTreeAutoscaling: true\n  networkPolicy:\n    mode: DenyAll\n")
    assert "kuberay RayCluster weakseg" in validate_cluster_config(path)


def test_kuberay_network_isolation_points_at_its_new_name(tmp_path: Path):
    path, text = mutate(tmp_path, "kuberay.yaml", "  enableInTreeAutoscaling: true\n",
                        "  enableInTreeAutoscaling: true\n  networkIsolation:\n    mode: DenyAll\n")
    fails(path, line_of(text, "networkIsolation"), r"spec.networkIsolation", r"networkPolicy \(renamed in KubeRay v1\.7\.0\)")


def test_kuberay_checked_against_the_crd_schema_deep_down(tmp_path: Path):
    """Typos and wrong types inside the pod template and autoscalerOptions, which no hand-kept list covered."""
    path, text = mutate(tmp_path, "kuberay.yaml", "idleTimeoutSeconds: 600", "idleTimeoutSecond: 600")
    fails(path, line_of(text, "idleTimeoutSecond:"), r"spec.autoscalerOptions.idleTimeoutSecond",
          r"unknown field .*did you mean idleTimeoutSeconds\?")
    path, text = mutate(tmp_path, "kuberay.yaml", "mountPath: /dev/shm", "mountPth: /dev/shm")
    fails(path, line_of(text, "mountPth"),
          r"spec.workerGroupSpecs\[0\].template.spec.containers\[0\].volumeMounts\[1\].mountPth",
          r"did you mean mountPath\?")
    path, text = mutate(tmp_path, "kuberay.yaml", "maxReplicas: 8", "maxReplicas: eight")
    fails(path, line_of(text, "maxReplicas: eight"), r"spec.workerGroupSpecs\[0\].maxReplicas", r"'eight' is not of type")


def test_kuberay_image_of_another_ray_is_refused(tmp_path: Path):
    path, text = mutate(tmp_path, "kuberay.yaml", "            image: <your-registry>/weakseg:<tag>\n            resources",
                        "            image: rayproject/ray:latest\n            resources")
    fails(path, line_of(text, "rayproject/ray:latest"), r"spec.headGroupSpec.template.spec.containers\[0\].image",
          r"Ray 2\.60\.0")
