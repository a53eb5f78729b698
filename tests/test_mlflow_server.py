"""The real parts, as a user meets them: a search logging to a real `mlflow server`, then its UI in a browser.

A tracking server (the venv's `mlflow` binary, SQLite backend, artifacts served through the server) is
started on 127.0.0.1 at a free port; a small `weakseg search` logs to it over HTTP; the runs, params,
metrics and artifacts are read back through `MlflowClient` and compared with records weakseg does not
write to MLflow itself (Ray Tune's per-trial result.json and the persisted checkpoint folders). Then
headless Chromium renders the experiment's runs table, the run-comparison page and the Model Registry's
pages of the registered model; the rendered DOM must show the trial runs and the version with its source
run. The search's selected model is also loaded by models:/ URI in a fresh process with the Ray storage
folder gone, and must predict what the checkpoint predicts. The screenshots are saved in results/ui_check/,
and into results/ (mlflow_experiment.png, mlflow_compare.png, mlflow_model.png,
mlflow_registered_model.png, committed) when WEAKSEG_RECORD=1 is set, so that an
ordinary `make test` leaves the working tree clean. Chromium comes from scripts/ensure_chromium.sh (`make test` runs it first); without
it the browser test skips, saying so.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from weakseg.data.classes import VOC_CLASSES
from conftest import tiny_fixed
from weakseg.cluster.local import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("WEAKSEG_CHROMIUM", "/usr/bin/chromium"))
LAMS = [0.2, 0.6]
ITERATIONS = 8  # long enough for a non-zero mIoU on the screenshots
EVAL_EVERY = 4
GIT_HEAD = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "RAY_USAGE_STATS_ENABLED": "0"}


@dataclass
class Server:
    url: str
    port: int
    folder: Path
    proc: subprocess.Popen


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp{,6}) with a socket in LISTEN state on `port`."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr, hexport = fields[1].rsplit(":", 1)
            if int(hexport, 16) == port and fields[3] == "0A":  # 0A: TCP_LISTEN
                out.add(addr)
    return out


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow server did not answer in {timeout:g} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = folder / "server.log"
    env = {**os.environ, **QUIET, "HOME": str(folder / "home")}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server",
           "--backend-store-uri", f"sqlite:///{folder / 'store.db'}",
           "--host", "127.0.0.1", "--port", str(port),
           "--serve-artifacts", "--artifacts-destination", str(folder / "artifacts"),
           "--workers", "1"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    try:
        wait_healthy(url, proc, log, timeout=120)
        yield Server(url, port, folder, proc)
    finally:
        with_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        with_group(proc, signal.SIGKILL)  # the uvicorn worker too: it shares the server's process group
        proc.wait(timeout=20)


def with_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def search(server: Server, synth_root: Path):
    """A two-trial grid search (λ = 0.2, 0.6) logging to the server over HTTP."""
    folder = server.folder / "search"
    folder.mkdir()
    space = folder / "served.yaml"
    space.write_text(yaml.safe_dump({
        "name": "served",
        "base": "demo",
        "fixed": tiny_fixed(synth_root, {"optim.iterations": ITERATIONS, "train.eval_every": EVAL_EVERY,
                                         "train.log_every": 1, "train.overlays": 1}),
        "params": {"loss.lam": {"choice": LAMS}},
        "settings": {"sampler": "grid", "max_concurrent": 2, "resources": {"cpu": 1, "gpu": 0},
                     "storage_path": str(folder / "results" / "ray"), "results_dir": str(folder / "results"),
                     "mlflow": {"tracking_uri": server.url}},
    }, sort_keys=False))
    env = {**os.environ, **QUIET, "HOME": str(folder / "home"), "OMP_NUM_THREADS": "1",
           "RAY_TMPDIR": tempfile.mkdtemp(prefix="wsm", dir="/tmp")}  # AF_UNIX paths < 108 bytes
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-m", "weakseg", "search", str(space)], capture_output=True, text=True,
                       timeout=400, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return folder, space, r


def runs(url: str):
    client = MlflowClient(url)
    exp = client.get_experiment_by_name("served")
    found = client.search_runs([exp.experiment_id])
    parents = [r for r in found if r.data.tags.get("weakseg.role") == "search"]
    children = [r for r in found if r.data.tags.get("weakseg.role") == "trial"]
    return client, exp, parents, children


def ray_results(folder: Path) -> dict[str, list[dict]]:
    """trial id -> the rows Ray Tune wrote to the trial's result.json."""
    out = {}
    for f in (folder / "results" / "ray" / "served").glob("run_trial_*/result.json"):
        rows = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
        out[rows[0]["trial_id"]] = rows
    return out


def test_server_listens_on_loopback_only(server: Server):
    addrs = listening_addresses(server.port)
    assert addrs == {"0100007F"}, addrs  # 127.0.0.1, and no 0.0.0.0 / :: socket


def test_search_runs_params_metrics_and_artifacts_on_a_real_server(server: Server, search, tmp_path: Path):
    folder, space, r = search
    assert f"MLflow UI:  {server.url}" in r.stdout
    client, exp, parents, children = runs(server.url)
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # artifacts go through the server
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert len(children) == len(LAMS)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(float(c.data.params["loss.lam"]) for c in children) == LAMS
    assert parent.data.params["space.loss.lam"] == f"choice{LAMS}"

    by_trial = ray_results(folder)
    assert set(by_trial) == {c.data.tags["weakseg.trial_id"] for c in children}
    for c in children:
        assert c.info.status == "FINISHED" and c.data.tags["weakseg.outcome"] == "completed"
        assert c.data.params["optim.iterations"] == str(ITERATIONS) and c.data.params["model.backbone"] == "tiny"
        rows = by_trial[c.data.tags["weakseg.trial_id"]]
        assert {row["iteration"] for row in rows} == set(range(EVAL_EVERY, ITERATIONS + 1, EVAL_EVERY))
        for cls in VOC_CLASSES:
            key = f"val/iou/{cls}"
            history = {m.step: m.value for m in client.get_metric_history(c.info.run_id, key)}
            # a NaN IoU (class absent from prediction and truth) is not logged: the step is missing instead
            assert history == pytest.approx({row["iteration"]: row[key] for row in rows if not math.isnan(row[key])})
        absent = [cls for cls in VOC_CLASSES if math.isnan(rows[-1][f"val/iou/{cls}"])]
        assert absent and c.data.tags["weakseg.absent_classes"] == ",".join(absent)
        miou = {m.step: m.value for m in client.get_metric_history(c.info.run_id, "val/miou")}
        assert miou == pytest.approx({row["iteration"]: row["val/miou"] for row in rows})
        for key in ("val/miou", "val/boundary_iou"):  # one value per run, what the runs table sorts by
            assert c.data.metrics[f"final/{key}"] == pytest.approx(rows[-1][key])
            assert c.data.metrics[f"best/{key}"] == pytest.approx(max(row[key] for row in rows))

        # lineage: the code (checked against git itself) and the data set, with its digest
        assert c.data.tags["mlflow.source.git.commit"] == GIT_HEAD
        assert c.data.tags["weakseg.git_dirty"] in ("true", "false")
        (data,) = c.inputs.dataset_inputs
        assert data.dataset.name == "synthetic:train+val" and len(data.dataset.digest) == 16
        assert json.loads(data.dataset.profile)["images"] == {"train": 16, "val": 6}

        # artifacts: downloaded through the server, byte-identical to the trial's last checkpoint folder
        trial_dir = next((folder / "results" / "ray" / "served").glob(f"run_trial_{c.data.tags['weakseg.trial_id']}_*"))
        last = max(trial_dir.glob("checkpoint_*"))
        dst = tmp_path / c.info.run_id
        dst.mkdir()
        for name in ("eval/classes.md", "eval/confusion.png", "config.yaml"):
            got = Path(client.download_artifacts(c.info.run_id, name, str(dst)))
            assert got.read_bytes() == (last / name).read_bytes(), name
        stored = server.folder / "artifacts" / exp.experiment_id / c.info.run_id / "artifacts" / "eval" / "classes.md"
        assert stored.is_file()  # kept by the server in --artifacts-destination, not on the client
    got = Path(client.download_artifacts(parent.info.run_id, space.name, str(tmp_path)))  # the space file itself
    assert got.read_bytes() == space.read_bytes()
    got = Path(client.download_artifacts(parent.info.run_id, "summary/trials.md", str(tmp_path)))
    assert got.read_text() == (folder / "results" / "served" / "trials.md").read_text()


def test_parent_run_has_lineage_and_the_driver_nodes_system_metrics(server: Server, search):
    client, exp, parents, children = runs(server.url)
    parent = parents[0]
    assert parent.data.tags["mlflow.source.git.commit"] == GIT_HEAD
    assert [i.dataset.digest for i in parent.inputs.dataset_inputs] == [children[0].inputs.dataset_inputs[0].dataset.digest]
    assert any(k.startswith("system/cpu_utilization") for k in parent.data.metrics), sorted(parent.data.metrics)


def trials_md_order(folder: Path) -> list[str]:
    """Trial ids in the order of trials.md's table (its ranking)."""
    lines = (folder / "results" / "served" / "trials.md").read_text().splitlines()
    return [l.split("|")[2].strip() for l in lines if l.startswith("| ") and l.split("|")[1].strip().isdigit()]


def test_sorting_the_runs_table_by_final_val_miou_gives_the_order_of_trials_md(server: Server, search):
    folder, _, _ = search
    client, exp, parents, children = runs(server.url)
    # what the UI does when the user sorts the runs table by the column final/val/miou
    ordered = client.search_runs([exp.experiment_id], filter_string="tags.`weakseg.role` = 'trial'",
                                 order_by=["metrics.`final/val/miou` DESC", "tags.`weakseg.trial_id` ASC"])
    by_ray = sorted(ray_results(folder).items(), key=lambda kv: (-kv[1][-1]["val/miou"], kv[0]))
    assert [r.data.tags["weakseg.trial_id"] for r in ordered] == [t for t, _ in by_ray] == trials_md_order(folder)


def selected(folder: Path) -> tuple[str, Path]:
    """The search's selected trial and checkpoint, from its own summary (search.json)."""
    info = json.loads((folder / "results" / "served" / "search.json").read_text())
    return info["best_trial"], Path(info["best_checkpoint"]) / "checkpoint.pt"


def val_batch(synth_root: Path) -> np.ndarray:
    """Two val images cropped to a common size: a (2, H, W, 3) uint8 batch."""
    from weakseg.data.voc import read_image

    ids = (synth_root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:2]
    ims = [read_image(synth_root / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{i}.jpg").permute(1, 2, 0).numpy()
           for i in ids]
    h, w = min(i.shape[0] for i in ims), min(i.shape[1] for i in ims)
    return np.stack([i[:h, :w] for i in ims])


FRESH = """
import sys, numpy as np, mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
np.save(sys.argv[3], model.predict(np.load(sys.argv[2])))
assert "ray" not in sys.modules, "loading a weakseg model imported Ray"
print(model.metadata.signature.inputs.to_json())
"""


def test_the_registered_model_loads_by_alias_in_a_fresh_process_without_the_ray_storage(
        server: Server, search, synth_root: Path, tmp_path: Path):
    import torch

    from weakseg.checkpoint import load_model
    from weakseg.cli import main
    from weakseg.engine import predict_probs

    folder, _, r = search
    client, exp, parents, children = runs(server.url)
    trial, ckpt = selected(folder)
    (version,) = client.search_model_versions("name = 'served'")  # settings.mlflow.register_as defaults to the name
    assert parents[0].data.tags["weakseg.model_uri"] == f"models:/served/{version.version}"
    assert f"MLflow model: models:/served/{version.version} (trial {trial})" in r.stdout
    run_of = {c.data.tags["weakseg.trial_id"]: c.info.run_id for c in children}
    assert version.run_id == run_of[trial]  # the model is the selected trial's, and links back to it
    assert version.tags["weakseg.search_run_id"] == parents[0].info.run_id
    assert version.tags["weakseg.trial_id"] == trial and version.tags["weakseg.checkpoint"] == str(ckpt.parent)
    assert version.tags["weakseg.search"] == str(folder / "results" / "ray" / "served")
    assert f"selected trial ({trial}," in version.description
    client.set_registered_model_alias("served", "champion", version.version)  # "promote" (README)

    # the oracle: the checkpoint itself, read from the Ray storage folder in this process
    images = val_batch(synth_root)
    model, _, _ = load_model(ckpt, "cpu")
    want = predict_probs(model, torch.from_numpy(images).permute(0, 3, 1, 2)).argmax(dim=1).numpy()
    np.save(tmp_path / "images.npy", images)
    main(["evaluate", str(ckpt), "--limit", "3", "--workers", "0", "--overlays", "0", "--out", str(tmp_path / "ckpt")])

    storage = folder / "results" / "ray"
    hidden = storage.with_name("ray-hidden")
    storage.rename(hidden)  # no Ray storage from here on
    try:
        env = {**os.environ, **QUIET, "MLFLOW_TRACKING_URI": server.url, "HOME": str(tmp_path)}
        fresh = subprocess.run([sys.executable, "-c", FRESH, "models:/served@champion", str(tmp_path / "images.npy"),
                                str(tmp_path / "got.npy")], capture_output=True, text=True, timeout=300,
                               env=env, cwd=tmp_path)
        assert fresh.returncode == 0, fresh.stderr[-3000:]
        ev = subprocess.run([sys.executable, "-m", "weakseg", "evaluate", f"models:/served/{version.version}",
                             "--limit", "3", "--workers", "0", "--overlays", "0", "--out", str(tmp_path / "model")],
                            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert ev.returncode == 0, ev.stderr[-3000:]
    finally:
        hidden.rename(storage)
    got = np.load(tmp_path / "got.npy")
    assert got.shape == images.shape[:3] and got.dtype == np.int64
    np.testing.assert_array_equal(got, want)
    assert '"uint8"' in fresh.stdout and "[-1, -1, -1, 3]" in fresh.stdout  # the signature
    assert json.loads((tmp_path / "model" / "metrics.json").read_text()) == \
        pytest.approx(json.loads((tmp_path / "ckpt" / "metrics.json").read_text()), nan_ok=True)


# ------------------------------------------------------------------------------------- the browser


def chromium(args: list[str], profile: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--window-size=1600,1000", "--virtual-time-budget=15000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "HOME": str(profile)})


def render(url: str, png: Path, tmp: Path) -> str:
    """The DOM after the page's scripts ran, and a screenshot of the same page saved (atomically) to `png`."""
    dom = chromium(["--dump-dom", url], tmp / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    shot = tmp / png.name
    r = chromium([f"--screenshot={shot}", url], tmp / "profile-shot")
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1600, 1000) and len(im.getcolors(1 << 16) or range(1 << 16)) > 20  # not a blank page
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp_png = png.with_name(f".{png.name}.tmp")
    with Image.open(shot) as im:  # 256 colours: a UI screenshot stays legible at a third of the size
        im.convert("RGB").quantize(256, dither=Image.Dither.NONE).save(tmp_png, format="PNG", optimize=True)
    os.replace(tmp_png, png)
    return dom.stdout


def test_mlflow_ui_shows_the_trial_runs(server: Server, search, tmp_path: Path):
    if not CHROMIUM.is_file():
        # `make test` (and so CI) installs it first; a missing browser fails unless explicitly waived
        why = f"{CHROMIUM} is missing: scripts/ensure_chromium.sh installs it (as root, with apt-get)"
        if os.environ.get("WEAKSEG_SKIP_BROWSER") == "1":
            pytest.skip(why + "; skipped because WEAKSEG_SKIP_BROWSER=1")
        pytest.fail(why + "; set WEAKSEG_SKIP_BROWSER=1 to skip this check on a machine without it")
    client, exp, parents, children = runs(server.url)
    names = sorted(c.info.run_name for c in children)
    assert all(n.startswith("run_trial_") for n in names)

    # every run leaves its screenshots in results/ui_check/ (ignored by git); WEAKSEG_RECORD=1 refreshes
    # the committed results/mlflow_*.png
    shots = REPO / "results" if os.environ.get("WEAKSEG_RECORD") == "1" else REPO / "results" / "ui_check"
    # the runs table sorted by final/val/miou (trials.md's ranking): MLflow 3 lists child runs flat then
    order = urllib.parse.quote("metrics.`final/val/miou`")
    dom = render(f"{server.url}/#/experiments/{exp.experiment_id}/runs?orderByKey={order}&orderByAsc=false",
                 shots / "mlflow_experiment.png", tmp_path)
    for n in names + [parents[0].info.run_name]:
        assert n in dom, f"{n} not on the experiment page"

    # what "tick the trial runs, Compare" opens
    ids = urllib.parse.quote(json.dumps([c.info.run_id for c in children]))
    dom = render(f"{server.url}/#/compare-runs?runs={ids}&experiments={urllib.parse.quote(json.dumps([exp.experiment_id]))}",
                 shots / "mlflow_compare.png", tmp_path)
    assert f"Comparing {len(children)} Runs" in dom
    for n in names:
        assert n in dom, f"{n} not on the comparison page"
    # the metrics table is virtualised (only the rows in view are in the DOM), and since the image-level
    # diagnostics (val/image_auc/<class>, ...) sort before val/iou/<class>, check the rows in view
    assert "loss.lam" in dom and "val/miou" in dom and "final/val/miou" in dom

    # the Model Registry: the registered model's page and its version, linked to the selected trial's run
    (version,) = client.search_model_versions("name = 'served'")
    dom = render(f"{server.url}/#/models/served/versions/{version.version}", shots / "mlflow_model.png", tmp_path)
    run_name = client.get_run(version.run_id).info.run_name
    assert f"Version {version.version}" in dom and run_name in dom, "the model version page lacks its source run"
    dom = render(f"{server.url}/#/models/served", shots / "mlflow_registered_model.png", tmp_path)
    assert "served" in dom and f"Version {version.version}" in dom
