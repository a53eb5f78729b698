"""A real multi-node Ray on this machine, for tests and `cluster/local_multinode.py`.

`LocalCluster` starts a head plus workers with logical GPUs (each its own
raylet, reached at 127.0.0.1, token auth on) and tears down exactly the
processes it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from weakseg.cluster.validate import fmt_resources
from weakseg.errors import UserError


def free_port() -> int:
    """A TCP port free on every interface right now, outside the kernel's ephemeral range.

    Ports from the ephemeral range (what binding port 0 returns) are handed out again at once to
    the next process that asks, e.g. another Ray node starting at the same moment; a random port
    in 20000-32000 (above Ray's worker ports, below the ephemeral range) is not.
    """
    rng = secrets.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise UserError("no free TCP port found in 20000-32000 on this machine")


NODE_MARKER = "WEAKSEG_LOCAL_CLUSTER"

_NODES_SCRIPT = """
import json, sys, time, ray
want, deadline = int(sys.argv[2]), time.time() + float(sys.argv[3])
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
while True:
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) >= want or time.time() > deadline:
        break
    time.sleep(0.5)
print(json.dumps([{"node_id": n["NodeID"], "resources": n["Resources"]} for n in alive]))
"""


class LocalCluster:
    """A multi-node Ray on this machine: a head and `workers` worker nodes, each its own raylet.

    Clients reach it at 127.0.0.1; Ray 2.60 on Linux still advertises nodes under the machine's own
    address and its gRPC servers listen on all interfaces (no setting narrows that): token auth guards them.

    Every node is a `ray start --block` child of this process in its own session, so `stop()` ends
    exactly these processes (never other Rays on the machine, as `ray stop` would). Token auth is on
    with a fresh token in `root`; clients get it through `client_env()`.
    """

    def __init__(self, root: Path, *, workers: int = 2, worker_cpus: int = 1, worker_gpus: int = 1,
                 head_cpus: int = 1, head_gpus: int = 0, dashboard: bool = False,
                 object_store_mb: int = 100, timeout_s: float = 120.0) -> None:
        self.root = Path(root)
        self.workers, self.worker_cpus, self.worker_gpus = workers, worker_cpus, worker_gpus
        self.head_cpus, self.head_gpus, self.dashboard = head_cpus, head_gpus, dashboard
        self.object_store_mb, self.timeout_s = object_store_mb, timeout_s
        self.port = 0
        self.dashboard_port = 0
        self.nodes: list[dict[str, Any]] = []
        self._procs: list[subprocess.Popen] = []
        self._logs: list[Any] = []

    # ---- what clients need
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def token_path(self) -> Path:
        return self.root / "auth_token"

    @property
    def temp_dir(self) -> Path:
        return self.root / "ray"

    @property
    def node_pids(self) -> list[int]:
        """PIDs of the `ray start --block` processes, one per node; each leads its own session."""
        return [p.pid for p in self._procs]

    def client_env(self) -> dict[str, str]:
        """Environment for a driver or `ray` CLI call against this cluster (merge into os.environ).

        RAY_AUTH_TOKEN, if set, takes precedence over RAY_AUTH_TOKEN_PATH: drop it from the environment.
        """
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path), "RAY_ADDRESS": self.address,
                "RAY_USAGE_STATS_ENABLED": "0"}

    # ---- lifecycle
    def start(self) -> "LocalCluster":
        """Start the head, then the workers; return once every node is alive (or raise UserError and clean up)."""
        if len(str(self.temp_dir)) > 60:
            # Ray puts Unix sockets under the temp dir; their paths must stay under ~107 bytes.
            raise UserError(f"{self.root}: path too long for Ray's socket files; use a short folder such as /tmp/x")
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        self.port = free_port()
        self.dashboard_port = free_port()
        try:
            self._spawn("head", ["--head", f"--port={self.port}", f"--num-cpus={self.head_cpus}",
                                 f"--num-gpus={self.head_gpus}", f"--temp-dir={self.temp_dir}",
                                 f"--include-dashboard={'true' if self.dashboard else 'false'}",
                                 "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"])
            self._wait_started()
            # One node at a time: nodes starting together on one machine race for the same socket files.
            for i in range(self.workers):
                self._spawn(f"worker{i + 1}", [f"--address={self.address}", f"--num-cpus={self.worker_cpus}",
                                               f"--num-gpus={self.worker_gpus}"])
                self._wait_started()
            self.nodes = self._wait_nodes(1 + self.workers)
        except BaseException:
            self.stop()
            raise
        return self

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        env.update(self.client_env())
        env.pop("RAY_ADDRESS")
        env[NODE_MARKER] = str(self.root)  # inherited by every process of the nodes, found again in stop()
        if sys.platform in ("darwin", "win32"):
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"  # Ray refuses multi-node there unless asked
        return env

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.root / f"{name}.log", "w")
        self._logs.append(log)
        ray_cli = Path(sys.executable).parent / "ray"
        # --node-ip-address=127.0.0.1 holds on macOS; on Linux Ray swaps in the machine's address.
        cmd = [str(ray_cli) if ray_cli.exists() else "ray", "start", "--block", "--node-ip-address=127.0.0.1",
               f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
               "--dashboard-agent-listen-port=0", "--disable-usage-stats", *args]
        self._procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self._env(), start_new_session=True))

    def _check_alive(self) -> None:
        for p, log in zip(self._procs, self._logs):
            if p.poll() is not None:
                tail = Path(log.name).read_text()[-2000:]
                raise UserError(f"{log.name}: `ray start` exited with {p.returncode}:\n{tail}")

    def _wait_started(self) -> None:
        """Wait until the node spawned last says it is up (`ray start` prints "Ray runtime started")."""
        log = Path(self._logs[-1].name)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            if "Ray runtime started" in log.read_text(errors="replace"):
                return
            time.sleep(0.3)
        raise UserError(f"{log}: the node did not start in {self.timeout_s:g} s")

    def _wait_nodes(self, want: int) -> list[dict[str, Any]]:
        self._check_alive()
        env = self._env()
        env["RAY_ADDRESS"] = self.address
        try:
            out = subprocess.run([sys.executable, "-c", _NODES_SCRIPT, self.address, str(want), str(self.timeout_s)],
                                 capture_output=True, text=True, env=env, timeout=self.timeout_s + 60)
        except subprocess.TimeoutExpired:
            raise UserError(f"{self.root}: the cluster did not answer in {self.timeout_s:g} s") from None
        if out.returncode != 0:
            raise UserError(f"{self.root}: cannot list the cluster's nodes:\n{out.stderr[-2000:]}")
        nodes = json.loads(out.stdout.strip().splitlines()[-1])
        if len(nodes) < want:
            self._check_alive()
            raise UserError(f"{self.root}: {len(nodes)} of {want} nodes came up in {self.timeout_s:g} s "
                            f"(logs: {self.root}/*.log)")
        return nodes

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM every node (workers first; `ray start --block` then stops its own processes), SIGKILL leftovers."""
        for p in reversed(self._procs):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        # Anything still in a node's session (raylet workers, agents) belongs to this cluster alone,
        # and so does any process that inherited a node's environment marker.
        for p in self._procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        for pid in self._stragglers():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for log in self._logs:
            log.close()
        self._procs, self._logs = [], []

    def _stragglers(self) -> list[int]:
        """PIDs of this cluster's node processes, by the marker in their environment (Linux /proc only)."""
        marker = f"{NODE_MARKER}={self.root}".encode()
        proc = Path("/proc")
        if not proc.is_dir() or not self.port:
            return []
        out = []
        for d in proc.iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                with contextlib.suppress(OSError):
                    if marker in (d / "environ").read_bytes().split(b"\0"):
                        out.append(int(d.name))
        return out

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


    def describe(self) -> str:
        """What to type in another shell to use this cluster."""
        return _describe_local(self)


def _describe_local(cluster: LocalCluster) -> str:
    env = cluster.client_env()
    lines = [
        f"Ray cluster up at {cluster.address}: a head and {cluster.workers} worker node(s), token auth",
        f"  nodes: " + ", ".join(f"{n['node_id'][:8]} {fmt_resources({k: v for k, v in n['resources'].items() if k in ('CPU', 'GPU')})}"
                                 for n in cluster.nodes),
        "In another shell:",
        "  unset RAY_AUTH_TOKEN; " + " ".join(f"export {k}={v};" for k, v in env.items()),
        f"  weakseg search search_spaces/demo.yaml --address {cluster.address}",
    ]
    if cluster.dashboard:
        lines.append(f"  dashboard and jobs: http://127.0.0.1:{cluster.dashboard_port}  "
                     f"(ray job submit --address http://127.0.0.1:{cluster.dashboard_port} -- ...)")
    lines.append("Ctrl-C here stops the cluster.")
    return "\n".join(lines)
