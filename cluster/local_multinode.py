#!/usr/bin/env python
"""A multi-node Ray cluster on this machine, to try the cluster path of `weakseg search` on a laptop.

Starts a head and N worker nodes (each its own raylet, with logical GPUs if you ask for them, token
auth on, optionally the dashboard on 127.0.0.1), prints what to type in another shell, and stops every process it
started when you press Ctrl-C. Nothing is left behind; other Ray instances on the machine are not
touched (unlike `ray stop`).

    python cluster/local_multinode.py --workers 2 --worker-gpus 1
    # in another shell, with the environment it prints:
    weakseg search search_spaces/demo.yaml --address 127.0.0.1:PORT

Trials asking {gpu: 1} run on the workers' logical GPUs (Ray sets CUDA_VISIBLE_DEVICES; on a machine
without a GPU keep train.device: cpu in the space). Linux; on macOS Ray needs
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, which this script sets for the nodes.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
from pathlib import Path

from weakseg.errors import UserError
from weakseg.cluster.local import LocalCluster


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    p.add_argument("--worker-cpus", type=int, default=1, help="CPUs per worker node (default 1)")
    p.add_argument("--worker-gpus", type=int, default=1, help="logical GPUs per worker node (default 1)")
    p.add_argument("--head-cpus", type=int, default=1, help="CPUs of the head node (default 1)")
    p.add_argument("--root", type=Path, default=None,
                   help="folder for logs, token and Ray's session (default: a new /tmp/wsc* folder; keep it short)")
    p.add_argument("--dashboard", action="store_true",
                   help="start the Ray dashboard on 127.0.0.1 too, for `ray job submit` (needs ray[default])")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the nodes (default 180)")
    args = p.parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="wsc", dir="/tmp"))
    cluster = LocalCluster(root, workers=args.workers, worker_cpus=args.worker_cpus, worker_gpus=args.worker_gpus,
                           head_cpus=args.head_cpus, head_gpus=0, dashboard=args.dashboard, object_store_mb=500,
                           timeout_s=args.timeout)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        cluster.start()
        print(cluster.describe(), flush=True)
        print(f"logs: {root}/*.log and {cluster.temp_dir}/session_latest/logs", flush=True)
        stop.wait()
    except UserError as e:
        print(f"local_multinode: {e}", file=sys.stderr)
        return 2
    finally:
        print("stopping the cluster ...", flush=True)
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
