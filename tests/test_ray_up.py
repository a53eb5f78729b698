"""The real cluster path, end to end on this machine: `ray up` -> `ray job submit weakseg search` -> fetch -> `ray down`.

What a user does with cluster/onprem.yaml, with nothing of it replaced: an SSH server (Debian's
openssh-server, installed here if missing) serves a head at 127.0.0.1 and two GPU workers at
127.0.0.2 and 127.0.0.3 (all of 127.0.0.0/8 is loopback on Linux); the real `ray up -y` syncs this
checkout with the shipped rsync rules and runs the shipped setup_commands (cluster/setup.sh: the
pinned install and `pip install -e`) on every node; the search goes in with `ray job submit` as
cluster/README.md says, and the results come back with its `ray rsync-down` commands.

The oracles are independent of weakseg: Ray's per-trial result.json names the node each report came
from, the MLflow store is read with sqlite3, the summary folder is listed on disk.

Hermetic: the nodes live in a network, PID and mount namespace of their own (`unshare`), so Ray's
standard ports, its /tmp/ray and the `ray stop` that `ray up`/`ray down` run on the nodes touch
nothing else on the machine; killing the namespace's first process ends every process the cluster
started, even when the test fails. The one difference from a real node: the node venv
(~/weakseg-venv) is made beforehand on top of this test environment's packages, so that setup.sh's
pip finds every pinned version installed instead of downloading CUDA torch; setup.sh's install
commands themselves run unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import sysconfig
import tempfile
import time
from getpass import getuser
from pathlib import Path

import pytest
import yaml

from weakseg.data.synthetic import make_synthetic

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # apt-get (up to 15 min) before ~4 min of test

REPO = Path(__file__).resolve().parents[1]
HEAD, WORKERS = "127.0.0.1", ("127.0.0.2", "127.0.0.3")
SAMPLES, ITERATIONS = 2, 4
SUMMARY = {"trials.csv", "trials.md", "best_config.yaml", "search.json"}  # README's results folder
BIN = Path(sys.executable).parent
NODE_HOME = pwd.getpwuid(os.geteuid()).pw_dir  # the nodes' ~, where the test's home folder is mounted

# One "machine": PID 1 of a PID and mount namespace of its own (so a node's `ray stop` stops that node
# only). It mounts the shared /data, its own /tmp/ray and its own home folder (over the SSH user's home:
# ssh, and so Ray's launcher, finds ~/ray_bootstrap_key.pem through it), runs an sshd on the node's
# address, reaps orphans (Ray's daemons, the MLflow server), and takes them all down when it ends.
INIT = r"""
import os, signal, subprocess, sys
node, data, home = sys.argv[1:4]
subprocess.run(["mount", "--bind", data, "/data"], check=True)
subprocess.run(["mount", "--bind", node + "/raytmp", "/tmp/ray"], check=True)
for keep in sys.argv[4:]:  # what the node needs from the real home (e.g. a pyenv Python): mounted through
    os.makedirs(node + "/home/" + keep, exist_ok=True)
    subprocess.run(["mount", "--bind", home + "/" + keep, node + "/home/" + keep], check=True)
subprocess.run(["mount", "--rbind", node + "/home", home], check=True)
log = open(node + "/sshd.log", "w")
sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", node + "/sshd_config"], stdout=log, stderr=log)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    pid, _ = os.waitpid(-1, 0)
    if pid == sshd.pid:
        sys.exit(1)
"""


def _run(cmd: list[str], *, timeout: float, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}")
    return proc


def _ensure_sshd_and_rsync() -> None:
    """Debian's openssh-server and rsync: installed with apt when missing (CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: it installs openssh-server, mounts the nodes' /data and runs sshd in namespaces")
    for tool in ("unshare", "nsenter", "ip", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs `{tool}` (util-linux/iproute2) to keep the cluster in namespaces of its own")
    if Path("/usr/sbin/sshd").exists() and shutil.which("rsync") and shutil.which("ssh-keygen"):
        return
    if shutil.which("apt-get") is None:
        pytest.skip("no sshd/rsync and no apt-get to install them (Debian/Ubuntu only)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update", "-qq"], timeout=300, env=env)
    _run(["apt-get", "install", "-y", "-qq", "openssh-server", "openssh-client", "rsync"], timeout=600, env=env)


def _can_unshare() -> bool:
    probe = subprocess.run(["unshare", "--net", "--pid", "--mount", "--fork", "true"], capture_output=True)
    return probe.returncode == 0


def _from_home() -> list[str]:
    """The folders under the real home that hold this test's Python (a pyenv build, a venv), relative to it:
    the namespaces mount exactly these through (never a whole top-level folder such as a checkout)."""
    out = set()
    for p in {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}:
        with contextlib.suppress(ValueError):
            out.add(str(p.relative_to(Path(NODE_HOME).resolve())))
    return sorted((p for p in out if not any(p != q and p.startswith(q + "/") for q in out)), key=len)


def _node_venv(venv: Path) -> None:
    """~/weakseg-venv as a thin venv over this test environment: its packages through a .pth file,
    its console scripts (ray, mlflow, ...) re-pointed at the new interpreter."""
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", "--without-pip", str(venv)], timeout=120)
    here = Path(sysconfig.get_paths()["purelib"])
    there = Path(_run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                      timeout=60).stdout.strip())
    (there / "_weakseg_test_env.pth").write_text(f"{here}\n")
    for script in BIN.iterdir():
        dest = venv / "bin" / script.name
        if dest.exists() or not script.is_file():
            continue
        with contextlib.suppress(UnicodeDecodeError, OSError):
            first, rest = script.read_text().split("\n", 1)
            if first.startswith("#!") and Path(first[2:].strip()).parent == BIN:
                dest.write_text(f"#!{venv}/bin/python\n{rest}")
                dest.chmod(0o755)


def _cluster_config(root: Path, key: Path, name: str) -> dict:
    """cluster/onprem.yaml for three loopback addresses: its sync rules and setup commands as shipped."""
    cfg = yaml.safe_load((REPO / "cluster" / "onprem.yaml").read_text())
    cfg["cluster_name"] = name
    cfg["provider"] = {"type": "local", "head_ip": HEAD, "worker_ips": list(WORKERS)}
    cfg["auth"] = {"ssh_user": getuser(), "ssh_private_key": str(key)}

    def resize(cmds: list[str], cpus: int, gpus: int, extra: str) -> list[str]:
        out = []
        for c in cmds:
            if re.search(r"\bray\s+start\b", c):
                assert "--num-cpus=" in c and "--num-gpus=" in c, c  # the shipped shape this test relies on
                c = re.sub(r"--num-cpus=\d+", f"--num-cpus={cpus}", c)
                c = re.sub(r"--num-gpus=\d+", f"--num-gpus={gpus}", c)
                c += f" --object-store-memory=100000000 {extra}"
            out.append(c)
        return out

    # One machine under three addresses: each node says which one it is (sshd's SSH_CONNECTION holds the
    # address it was reached at), so Ray's records tell the nodes apart as they would on real machines.
    me = '--node-ip-address="$(echo $SSH_CONNECTION | cut -d" " -f3)"'
    cfg["head_start_ray_commands"] = resize(cfg["head_start_ray_commands"], 1, 0, me)
    cfg["worker_start_ray_commands"] = resize(cfg["worker_start_ray_commands"], 1, 1, me)
    return cfg


def _space(root: Path) -> Path:
    space = root / "onprem_test.yaml"
    space.write_text(yaml.safe_dump({
        "name": "rayup",
        "base": "demo",
        "fixed": {"model.decoder_channels": 16, "model.skip_channels": 4, "data.dataset": "synthetic",
                  "data.root": "/data/VOCdevkit", "data.workers": 0, "data.crop_size": 64, "data.val_limit": 3,
                  "optim.batch_size": 4, "optim.iterations": ITERATIONS, "train.eval_every": 2,
                  "train.log_every": 1, "train.device": "cpu", "train.overlays": 0, "train.progress": "off"},
        "params": {"loss.lam": {"uniform": [0.0, 1.0]}},
        "settings": {"samples": SAMPLES, "scheduler": "none", "max_concurrent": 2,
                     "resources": {"cpu": 1, "gpu": 1}, "max_failures": 0,
                     # cluster/README.md's three settings for onprem.yaml
                     "storage_path": "/data/ray_results", "results_dir": f"{NODE_HOME}/weakseg-results",
                     "mlflow": {"tracking_uri": "http://127.0.0.1:5000"}},
    }, sort_keys=False))
    return space


def _monitor_log(root: Path) -> str:
    """The tail of the head's autoscaler log (it launches the workers), for failure messages."""
    logs = sorted((root / "nodes" / HEAD / "raytmp").glob("session_*/logs/monitor*"))
    return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:] for p in logs[-2:])


def _ours(root: Path) -> list[int]:
    """Live processes that name the test's folder in their command line or environment."""
    mark = str(root).encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            stat = (d / "stat").read_text()
            if stat[stat.rindex(")") + 2] == "Z":
                continue
            if mark in (d / "cmdline").read_bytes() or mark in (d / "environ").read_bytes():
                out.append(int(d.name))
    return out


def test_ray_up_job_submit_rsync_down_ray_down():
    _ensure_sshd_and_rsync()
    if not _can_unshare():
        pytest.skip("cannot create network/PID/mount namespaces here (needs CAP_SYS_ADMIN)")
    root = Path(tempfile.mkdtemp(prefix="wsru", dir="/tmp"))  # short: Ray's socket paths live under it
    made = [p for p in (Path("/data"), Path("/tmp/ray")) if not p.exists()]  # mount points for the namespace
    for p in made:
        p.mkdir()
    name = f"wsru{os.getpid()}"
    local, sd = root / "local", root / "sshd"
    nodes = {ip: root / "nodes" / ip for ip in (HEAD, *WORKERS)}
    home = nodes[HEAD] / "home"
    for d in (local / ".ray", local / "tmp", root / "data", sd, *[n / s for n in nodes.values() for s in ("home", "raytmp")]):
        d.mkdir(parents=True)
    procs: list[subprocess.Popen] = []
    cfg_path = root / "cluster.yaml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTHONPATH", "VIRTUAL_ENV"))}
    # Host side (your laptop): its own home (~/.ray/auth_token), temp dir (Ray's cluster state) and token mode.
    env.update(HOME=str(local), TMPDIR=str(local / "tmp"), RAY_TMPDIR=str(local / "tmp"), RAY_AUTH_MODE="token",
               RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}:{os.environ['PATH']}")
    # Ray 2.60's `ray up` defaults to autoscaler v2, which with the local provider launches the first
    # worker only (the second never comes); cluster/onprem.yaml's header tells users the same.
    env["RAY_UP_enable_autoscaler_v2"] = "0"
    try:
        # The network the "machines" share: loopback only, with Ray's and MLflow's standard ports free.
        procs.append(subprocess.Popen(["unshare", "--net", "--fork", "--kill-child", "sh", "-c",
                                       "ip link set lo up && exec sleep infinity"], start_new_session=True))
        inside = ["nsenter", f"--net=/proc/{procs[0].pid}/ns/net"]
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(sd / "host_key")], timeout=30)
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(sd / "id_ed25519")], timeout=30)
        (sd / "authorized_keys").write_text((sd / "id_ed25519.pub").read_text())
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        make_synthetic(root / "data" / "VOCdevkit", n_train=16, n_val=6, n_test=6, size=64, seed=3)
        for ip, node in nodes.items():
            (node / "home" / ".bashrc").write_text("")
            (node / "home" / "weakseg-test-node").write_text(ip)
            _node_venv(node / "home" / "weakseg-venv")
            (node / "sshd_config").write_text("\n".join([
                "Port 22", f"ListenAddress {ip}", f"HostKey {sd}/host_key", f"PidFile {node}/sshd.pid",
                f"AuthorizedKeysFile {sd}/authorized_keys", "PermitRootLogin prohibit-password",
                "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
                "MaxStartups 200", "MaxSessions 200", "AcceptEnv none", "Subsystem sftp internal-sftp", ""]))
            procs.append(subprocess.Popen(
                [*inside, "unshare", "--pid", "--mount", "--fork", "--kill-child", "--mount-proc", sys.executable,
                 "-c", INIT, str(node), str(root / "data"), NODE_HOME, *_from_home()],
                stdin=subprocess.DEVNULL, stdout=open(node / "init.log", "w"), stderr=subprocess.STDOUT,
                start_new_session=True))
        deadline = time.monotonic() + 30
        for ip, node in nodes.items():
            while not (node / "sshd.pid").exists():
                assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, \
                    (node / "init.log").read_text() + (node / "sshd.log").read_text()
                time.sleep(0.2)
            # Each address is its own machine, reached as the right user, with its own home.
            who = _run([*inside, "ssh", "-i", str(sd / "id_ed25519"), "-o", "StrictHostKeyChecking=no",
                        "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", f"{getuser()}@{ip}",
                        'cat ~/weakseg-test-node; echo " $SSH_CONNECTION"'], timeout=30).stdout.split()
            assert who[0] == ip and who[3] == ip, who

        _run(["ray", "get-auth-token", "--generate"], timeout=60, env=env)  # README, section 0
        assert (local / ".ray" / "auth_token").is_file()
        cfg_path.write_text(yaml.safe_dump(_cluster_config(root, sd / "id_ed25519", name), sort_keys=False))
        space = _space(root)

        _run([*inside, "ray", "up", "-y", "--disable-usage-stats", str(cfg_path)], timeout=600, env=env, cwd=REPO)
        # The checkout arrived complete (weakseg/data/ included), without the anchored excludes.
        synced = home / "weakseg"
        assert (synced / "weakseg" / "data" / "voc.py").is_file() and (synced / "cluster" / "setup.sh").is_file()
        assert not (synced / ".venv").exists() and not (synced / "results").exists()
        # setup.sh installed this checkout's copy, editable, into the node venv.
        where = _run([*inside, "ray", "exec", str(cfg_path), "cd / && python -c 'import weakseg; print(\"AT\", weakseg.__file__)'"],
                     timeout=120, env=env, cwd=REPO).stdout
        assert f"AT {NODE_HOME}/weakseg/weakseg/__init__.py" in where, where[-3000:]

        # The workers join through the head's autoscaler (it runs setup.sh on each); wait for both.
        probe = ("import json, ray; ray.init(address='auto', log_to_driver=False); "
                 "print('NODES', json.dumps(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))")
        alive: list[str] = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            out = _run([*inside, "ray", "exec", str(cfg_path), f'python -c "{probe}"'], timeout=120, env=env,
                       cwd=REPO, check=False).stdout
            m = re.search(r"NODES (\[.*\])", out)
            alive = json.loads(m.group(1)) if m else alive
            if set(WORKERS) <= set(alive):
                break
            time.sleep(10)
        assert set(WORKERS) <= set(alive), f"workers did not join: {alive}\n{_monitor_log(root)}"
        for ip in WORKERS:  # synced and installed there too, by the head's autoscaler
            assert (nodes[ip] / "home" / "weakseg" / "weakseg" / "data" / "voc.py").is_file()
            assert list((nodes[ip] / "home" / "weakseg-venv").glob("lib/python*/site-packages/__editable__*weakseg*"))

        # cluster/README.md, section 4: the search as a Ray job.
        job = _run([*inside, "ray", "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", ".",
                    "--", "weakseg", "search", str(space), "--address", "auto"], timeout=480, env=env, cwd=REPO)
        assert re.search(r"Job '[^']+' succeeded", job.stdout), job.stdout[-6000:]

        # Every trial ran to the end on a worker, and both workers ran one (Ray's own per-trial records).
        exp = root / "data" / "ray_results" / "rayup"
        trial_ips = {}
        for result in exp.glob("*/result.json"):
            rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
            assert rows and rows[-1]["training_iteration"] >= 1
            trial_ips[result.parent.name] = {r["node_ip"] for r in rows}
        assert len(trial_ips) == SAMPLES, sorted(trial_ips)
        assert all(len(ips) == 1 for ips in trial_ips.values()), trial_ips
        assert {ip for ips in trial_ips.values() for ip in ips} == set(WORKERS), trial_ips

        # README, "Results": fetch the summary folder and the MLflow store from the head.
        fetched = root / "fetched"
        fetched.mkdir()
        _run([*inside, "ray", "rsync-down", str(cfg_path), f"{NODE_HOME}/weakseg-results/rayup/",
              f"{fetched}/rayup/"], timeout=120, env=env, cwd=REPO)
        _run([*inside, "ray", "rsync-down", str(cfg_path), f"{NODE_HOME}/mlflow/mlflow.db",
              str(fetched / "mlflow.db")], timeout=120, env=env, cwd=REPO)
        assert {p.name for p in (fetched / "rayup").iterdir()} >= SUMMARY
        with (fetched / "rayup" / "trials.csv").open() as f:
            assert sum(1 for _ in f) == 1 + SAMPLES  # header + one row per trial
        db = sqlite3.connect(fetched / "mlflow.db")
        runs = db.execute("SELECT run_uuid, status FROM runs").fetchall()
        parents = {r for (r,) in db.execute("SELECT run_uuid FROM tags WHERE key = 'mlflow.parentRunId'")}
        assert len(runs) == 1 + SAMPLES and len(parents) == SAMPLES, runs
        assert {s for _, s in runs} == {"FINISHED"}, runs
        with_metric = {r for (r,) in db.execute("SELECT DISTINCT run_uuid FROM metrics WHERE key = 'val/miou'")}
        assert parents <= with_metric
        db.close()

        _run([*inside, "ray", "down", "-y", str(cfg_path)], timeout=180, env=env, cwd=REPO)
    finally:
        for p in reversed(procs):  # a node's unshare dies, --kill-child ends its PID 1, and with it every process there
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
        deadline = time.monotonic() + 20
        while _ours(root) and time.monotonic() < deadline:  # ssh control masters of `ray up` close with their server
            time.sleep(0.5)
        left = _ours(root)
        for pid in left:  # named after the test's own folder: started by it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        ctl = Path("/tmp") / f"ray_ssh_{hashlib.sha256(getuser().encode()).hexdigest()[:10]}" / \
            hashlib.sha256(name.encode()).hexdigest()[:10]
        shutil.rmtree(ctl, ignore_errors=True)
        for p in made:
            with contextlib.suppress(OSError):
                p.rmdir()
        shutil.rmtree(root, ignore_errors=True)
    assert left == [], f"processes of the test outlived it: {left}"
