"""`weakseg search` on a real multi-node Ray cluster with logical GPUs, on this machine.

A head (1 CPU, no GPU) and two workers (1 CPU, 1 GPU each) are separate raylets started with
`ray start` and token auth; the search connects with `--address` and asks {cpu: 1, gpu: 1} per trial,
two at a time. Ray's own records are the oracle: its experiment state says every trial TERMINATED,
its per-trial result.json holds the node each report came from, and `ray.nodes()` (read by the
cluster helper in a separate driver) says which nodes are the GPU workers.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from weakseg.cluster.local import LocalCluster
from conftest import tiny_fixed

pytestmark = pytest.mark.slow

ITERATIONS = 4
SAMPLES = 3


def leftovers(sids: set[int], token_path: Path) -> list[int]:
    """Live processes (from /proc) in one of the nodes' sessions or holding the cluster's token path."""
    marker = f"RAY_AUTH_TOKEN_PATH={token_path}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            stat = (d / "stat").read_text()
            environ = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, session, ...
        if fields[0] != "Z" and (int(fields[3]) in sids or marker in environ):
            out.append(int(d.name))
    return out


@pytest.fixture()
def short_root():
    """Ray's Unix sockets live under the cluster's temp dir: keep its path short."""
    root = Path(tempfile.mkdtemp(prefix="wsmn", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_search_spreads_gpu_trials_over_two_worker_nodes(tmp_path: Path, synth_root: Path, short_root: Path,
                                                         monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # nothing of Ray's lands in the real home
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    space = tmp_path / "multinode.yaml"
    space.write_text(yaml.safe_dump({
        "name": "multinode",
        "base": "demo",
        "fixed": tiny_fixed(synth_root, {"optim.iterations": ITERATIONS, "train.eval_every": 2,
                                         "train.log_every": 1, "train.overlays": 0}),
        "params": {"loss.lam": {"uniform": [0.0, 1.0]}},
        "settings": {"samples": SAMPLES, "scheduler": "none", "max_concurrent": 2,
                     "resources": {"cpu": 1, "gpu": 1}, "max_failures": 0,
                     "storage_path": str(tmp_path / "ray_results"), "results_dir": str(tmp_path / "results")},
    }, sort_keys=False))

    cluster = LocalCluster(short_root, workers=2, worker_cpus=1, worker_gpus=1, head_cpus=1, head_gpus=0,
                           timeout_s=120)
    sids = set()
    try:
        cluster.start()
        sids = set(cluster.node_pids)
        gpu_workers = {n["node_id"] for n in cluster.nodes if n["resources"].get("GPU", 0) == 1}
        head = [n["node_id"] for n in cluster.nodes if "node:__internal_head__" in n["resources"]]
        assert len(cluster.nodes) == 3 and len(gpu_workers) == 2 and len(head) == 1 and head[0] not in gpu_workers

        env = dict(os.environ)
        env.update(cluster.client_env())
        env.pop("RAY_ADDRESS")  # the address comes from --address
        proc = subprocess.run([sys.executable, "-m", "weakseg", "search", str(space), "--address", cluster.address],
                              capture_output=True, text=True, timeout=240, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finally:
        cluster.stop()
    assert sids and leftovers(sids, cluster.token_path) == [], "processes of the cluster outlived stop()"

    exp = tmp_path / "ray_results" / "multinode"
    state = json.loads(next(exp.glob("experiment_state-*.json")).read_text())
    statuses = [json.loads(t[0])["status"] if isinstance(t[0], str) else t[0]["status"] for t in state["trial_data"]]
    assert statuses == ["TERMINATED"] * SAMPLES

    trial_nodes = {}
    for result in exp.glob("*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        assert rows[-1]["iteration"] == ITERATIONS  # ran to the end, not stopped or crashed
        nodes = {r["node_id"] for r in rows}
        assert len(nodes) == 1  # a trial stays on its node
        trial_nodes[result.parent.name] = nodes.pop()
    assert len(trial_nodes) == SAMPLES
    assert set(trial_nodes.values()) <= gpu_workers  # never the GPU-less head
    assert set(trial_nodes.values()) == gpu_workers  # both workers ran trials
