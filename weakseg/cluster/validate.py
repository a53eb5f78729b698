"""Cluster launch configs: validation before `ray up` / `kubectl apply`.

`validate_cluster_config(path)` checks a `ray up` config (providers aws, gcp,
local) or a KubeRay `RayCluster` manifest without touching any cloud: a typo
found after twenty minutes of `ray up` on GPU machines is expensive. Launcher
configs go through Ray's own JSON schema and its credential-free config
preparation (`prepare_config`: defaults, merged setup commands, per-type worker
bounds), then through what weakseg needs on top:

- a strict key check with did-you-mean (Ray's schema lets some typos through,
  and its messages name no line);
- explicit `resources` per node type: `weakseg search` compares a trial's
  `{cpu, gpu}` with them before launching, and Ray's autodetection does not
  run for every provider;
- `RAY_AUTH_MODE` set explicitly in every `ray start`, with the token reaching
  every node (Ray 2.60 switches token auth on implicitly in some paths only);
- the Ray dashboard and the MLflow server bound to 127.0.0.1 (reached through
  SSH port forwarding), and no security rule open to 0.0.0.0/0;
- the sync `ray up` does, replayed with the config's own rsync rules into a
  temporary folder, must keep every file of the package and import (an
  unanchored "data" also drops weakseg/data/);
- no image known not to run the pinned torch (Ray's `latest_dlami`, old
  drivers, another Ray's rayproject/ray tag);
- `<your-...>` placeholders listed, and errors with `strict`.

KubeRay manifests are checked against the RayCluster CRD's own OpenAPI schema
(vendored from KubeRay v1.7.0 in schemas/), undeclared fields being errors, then
for the same security and resource rules.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, NoReturn

import yaml

from weakseg.errors import UserError

KeyPath = tuple  # of str (mapping keys) and int (list indices)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
AUTH_MODES = ("token", "disabled")

# Instance types weakseg's configs use or users commonly pick: (vCPUs, GPUs). Unknown types skip the check.
AWS_INSTANCES = {
    "m5.xlarge": (4, 0), "m5.2xlarge": (8, 0), "m5.4xlarge": (16, 0), "m6i.2xlarge": (8, 0),
    "g4dn.xlarge": (4, 1), "g4dn.2xlarge": (8, 1), "g4dn.12xlarge": (48, 4),
    "g5.xlarge": (4, 1), "g5.2xlarge": (8, 1), "g5.4xlarge": (16, 1), "g5.8xlarge": (32, 1),
    "g5.12xlarge": (48, 4), "g5.16xlarge": (64, 1), "g5.24xlarge": (96, 4), "g5.48xlarge": (192, 8),
    "g6.xlarge": (4, 1), "g6.2xlarge": (8, 1), "g6.12xlarge": (48, 4),
    "p4d.24xlarge": (96, 8), "p5.48xlarge": (192, 8),
}
GCP_MACHINES = {
    "n2-standard-4": (4, 0), "n2-standard-8": (8, 0), "e2-standard-8": (8, 0), "n1-standard-8": (8, 0),
    "a2-highgpu-1g": (12, 1), "a2-highgpu-2g": (24, 2), "a2-highgpu-4g": (48, 4), "a2-highgpu-8g": (96, 8),
    "a2-ultragpu-1g": (12, 1), "g2-standard-4": (4, 1), "g2-standard-8": (8, 1), "g2-standard-12": (12, 1),
    "g2-standard-16": (16, 1), "g2-standard-24": (24, 2), "g2-standard-48": (48, 4),
}
# Provider keys Ray reads that its schema does not list (the schema allows any): used for did-you-mean only.
EXTRA_PROVIDER_KEYS = (
    "coordinator_address", "external_head_ip", "use_external_head_ip", "key_pair", "disable_launch_config_check",
    "foreground_node_launch", "worker_rpc_drain", "use_node_id_as_ip", "launch_multiple",
)
PLACEHOLDER = re.compile(r"<your-[^<>\s]*>")
# Images on which the pinned torch (CUDA 13 build: glibc >= 2.28, NVIDIA driver >= 580) cannot run.
OLD_DRIVER = 580
SCHEMAS = Path(__file__).parent / "schemas"
# Fields KubeRay renamed: the CRD schema alone would only say "unknown".
KUBERAY_RENAMED = {"networkIsolation": "networkPolicy (renamed in KubeRay v1.7.0)"}


# ------------------------------------------------------------------------------ YAML with line numbers


def _render(path: KeyPath) -> str:
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or "(top level)"


def _collect_lines(node: yaml.Node, prefix: KeyPath, out: dict[KeyPath, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = prefix + (k.value,)
            out[key] = k.start_mark.line + 1
            _collect_lines(v, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[prefix + (i,)] = v.start_mark.line + 1
            _collect_lines(v, prefix + (i,), out)


class _Doc:
    """One YAML document of a file: its data and the line of every key, for messages that name both."""

    def __init__(self, file: Path, data: Any, lines: dict[KeyPath, int]):
        self.file, self.data, self.lines = file, data, lines

    def line(self, path: KeyPath) -> int:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return 1

    def fail(self, path: KeyPath, message: str) -> NoReturn:
        raise UserError(f"{self.file}:{self.line(path)}: {_render(path)}: {message}")


def _read_docs(file: Path) -> list[_Doc]:
    try:
        text = file.read_text()
    except OSError as e:
        raise UserError(f"{file}: cannot read ({e.strerror})") from None
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
        datas = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark else str(file)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}: malformed YAML: {problem}") from None
    docs = []
    for node, data in zip(nodes, datas):
        lines: dict[KeyPath, int] = {}
        if node is not None:
            _collect_lines(node, (), lines)
        docs.append(_Doc(file, data, lines))
    return [d for d in docs if d.data is not None]


def _check_keys(doc: _Doc, mapping: Any, path: KeyPath, allowed: tuple[str, ...] | list[str]) -> None:
    """Unknown keys are errors, with the closest known key as a suggestion."""
    if not isinstance(mapping, dict):
        doc.fail(path, f"must be a mapping, not {type(mapping).__name__}")
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else f" (known: {', '.join(sorted(allowed))})"
            doc.fail(path + (key,), f"unknown key{hint}")


def _typo_keys(doc: _Doc, mapping: dict, path: KeyPath, known: tuple[str, ...] | list[str]) -> None:
    """For open mappings (Ray lets any provider key through): flag only keys that look like typos of known ones."""
    for key in mapping:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.8)
        if close:
            doc.fail(path + (key,), f"unknown key; did you mean {close[0]}?")


# ------------------------------------------------------------------------------ validation


def validate_cluster_config(path: Path, *, strict: bool = False, checkout: Path | None = None) -> str:
    """Check a `ray up` config or a KubeRay RayCluster manifest; return a one-line summary.

    Raises `UserError` naming the file, line and key at fault. Needs no cloud credentials and no network.
    `<your-...>` placeholders are what a user fills in: reported in the summary, and errors with
    `strict` (before a launch). `checkout` is the folder `ray up` would sync for "." (default: the
    repository holding the config); its sync is replayed with the config's own rsync rules.
    """
    path = Path(path)
    docs = _read_docs(path)
    if not docs:
        raise UserError(f"{path}:1: empty file: expected a `ray up` config or a KubeRay RayCluster manifest")
    first = docs[0]
    if isinstance(first.data, dict) and ("apiVersion" in first.data or "kind" in first.data):
        summary = _validate_kuberay(path, docs)
    else:
        if len(docs) > 1:
            raise UserError(f"{path}:{docs[1].line(())}: a `ray up` config is a single YAML document")
        if not isinstance(first.data, dict):
            first.fail((), "a cluster config must be a mapping of keys to values")
        if "provider" not in first.data:
            close = difflib.get_close_matches("provider", [str(k) for k in first.data], n=1, cutoff=0.6)
            if close:
                first.fail((close[0],), "unknown key; did you mean provider?")
            first.fail((), "missing `provider` (a `ray up` config) and `apiVersion`/`kind` (a KubeRay manifest)")
        summary = _validate_launcher(first)
        summary += "; " + _check_sync(first, checkout)
    return summary + "; " + _placeholders(path, strict)


def _placeholders(path: Path, strict: bool) -> str:
    """`<your-...>` left in (comments aside): an error with `strict`, else a note in the summary."""
    found = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        code = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
        found += [(n, m.group()) for m in PLACEHOLDER.finditer(code)]
    if not found:
        return "no placeholders"
    if strict:
        n, ph = found[0]
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise UserError(f"{path}:{n}: {ph} is a placeholder: fill it in before launching{more}")
    names = sorted({ph for _, ph in found})
    return f"{len(found)} placeholder(s) to fill before launching ({', '.join(names)}; --strict fails on them)"


def _checkout_of(path: Path) -> Path | None:
    """The repository a shipped config lives in (the folder with pyproject.toml and weakseg/)."""
    for d in Path(path).resolve().parents:
        if (d / "pyproject.toml").is_file() and (d / "weakseg" / "__init__.py").is_file():
            return d
    return None


def _check_sync(doc: _Doc, checkout: Path | None = None) -> str:
    """Replay `ray up`'s sync of the checkout with the config's own rsync rules, then import the copy.

    Ray hands every rsync_exclude entry to rsync as `--exclude PATTERN` and every rsync_filter as
    `--filter 'dir-merge,- FILE'`; an unanchored "data" then also drops weakseg/data/. The copy must
    hold every file of the package and import every module.
    """
    cfg = doc.data
    mounts = cfg.get("file_mounts") or {}
    local = [r for r, src in mounts.items() if isinstance(src, str) and src.rstrip("/") in (".", "./")]
    if not local:
        return "checkout not synced by file_mounts"
    checkout = Path(checkout) if checkout is not None else _checkout_of(doc.file)
    if checkout is None:
        return "sync not replayed (no weakseg checkout around the config)"
    rsync = shutil.which("rsync")
    if rsync is None:
        return "sync not replayed (no rsync on this machine)"
    from weakseg.compat import rsync_filter_args

    rules = rsync_filter_args(cfg.get("rsync_exclude"), cfg.get("rsync_filter"))
    with tempfile.TemporaryDirectory(prefix="weakseg-sync-") as tmp:
        out = subprocess.run([rsync, "-a", *rules, f"{checkout}/", f"{tmp}/"], capture_output=True, text=True)
        key = ("rsync_exclude",) if "rsync_exclude" in cfg else ("file_mounts",)
        if out.returncode != 0:
            doc.fail(key, f"rsync with these rules fails: {out.stderr.strip()[:300]}")
        pkg = checkout / "weakseg"
        want = {p.relative_to(checkout) for p in pkg.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
        got = {p.relative_to(tmp) for p in (Path(tmp) / "weakseg").rglob("*") if p.is_file()}
        lost = sorted(str(p) for p in want - got)
        if lost:
            doc.fail(key, f"the synced checkout loses {len(lost)} file(s) of the package, e.g. {lost[0]}: anchor "
                          'the pattern that matches it ("/data", not "data")')
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env["OMP_NUM_THREADS"] = "1"
        res = subprocess.run([sys.executable, "-c", _IMPORT_ALL, tmp], capture_output=True, text=True, env=env,
                             cwd=tmp, timeout=600)
        if res.returncode != 0:
            doc.fail(key, f"the synced checkout does not import: {res.stderr.strip().splitlines()[-1][:300]}")
        n = int(res.stdout.split()[-1])
    return f"synced checkout imports ({n} modules)"


# Imports every module of the synced copy, from the copy only; prints how many.
_IMPORT_ALL = """
import importlib, pkgutil, sys
root = sys.argv[1]
sys.path.insert(0, root)
import weakseg
assert weakseg.__file__.startswith(root), weakseg.__file__
names = [m.name for m in pkgutil.walk_packages(weakseg.__path__, "weakseg.") if not m.name.endswith(".__main__")]
for name in names:
    importlib.import_module(name)
print(len(names) + 1)
"""


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@contextlib.contextmanager
def _quiet_ray() -> Iterator[None]:
    """Ray's config preparation prints and logs as it goes (for `ray up`); a validator should not."""
    loggers = [logging.getLogger(n) for n in ("ray.autoscaler", "ray")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _validate_launcher(doc: _Doc) -> str:
    cfg = doc.data
    schema = _ray_schema()
    props = schema["properties"]
    _check_keys(doc, cfg, (), list(props))
    provider = cfg["provider"]
    if not isinstance(provider, dict) or not isinstance(provider.get("type"), str):
        doc.fail(("provider",), "must be a mapping with a `type` (aws, gcp, local, ...)")
    ptype = provider["type"]
    if ptype not in ("aws", "gcp", "local"):
        doc.fail(("provider", "type"), f"{ptype!r}: weakseg ships and checks aws, gcp and local (on-prem) configs; "
                                       "for Kubernetes use a KubeRay RayCluster manifest (cluster/kuberay.yaml)")
    _typo_keys(doc, provider, ("provider",), list(props["provider"]["properties"]) + list(EXTRA_PROVIDER_KEYS))
    for block in ("auth", "docker"):
        if block in cfg:
            _check_keys(doc, cfg[block], (block,), list(props[block]["properties"]))
    node_props = props["available_node_types"]["patternProperties"][".*"]["properties"]
    types = cfg.get("available_node_types")
    if types is None and ptype != "local":
        doc.fail((), "declare available_node_types (a head type and GPU worker types, each with explicit "
                     "resources); Ray's defaults are small CPU machines with autodetected resources")
    if types is not None:
        if not isinstance(types, dict):
            doc.fail(("available_node_types",), "must be a mapping of node type names to node types")
        for name, nt in types.items():
            _check_keys(doc, nt, ("available_node_types", name), list(node_props))
        if ptype != "local":
            _check_resources_declared(doc, types)

    import jsonschema

    try:
        jsonschema.validate(cfg, schema)
    except jsonschema.ValidationError as e:
        doc.fail(tuple(e.absolute_path), f"{e.message} (Ray's cluster schema)")

    from weakseg.compat import prepare_cluster_config

    try:
        with _quiet_ray():
            prepared = prepare_cluster_config(copy.deepcopy(cfg))
    except jsonschema.ValidationError as e:
        doc.fail(tuple(e.absolute_path), f"{e.message} (after Ray's defaults)")
    except Exception as e:  # Ray raises ValueError, RuntimeError, AssertionError and click exceptions here
        msg = getattr(e, "message", None) or str(e) or type(e).__name__
        doc.fail(_guess_key(msg), f"Ray's config preparation rejects it: {msg}")

    if ptype == "local":
        head_res, worker_res = _check_local(doc, prepared)
    else:
        _check_node_types(doc, cfg, ptype)
    _check_images(doc, cfg, ptype)
    auth = _check_auth(doc, cfg, prepared)
    dash = _check_dashboard(doc, prepared)
    mlflow = _check_mlflow(doc, prepared)
    if ptype == "aws":
        _check_aws_network(doc, cfg)
    elif ptype == "gcp":
        _check_gcp_network(doc, cfg)

    where = {"aws": provider.get("region", ""), "gcp": provider.get("project_id", ""),
             "local": provider.get("head_ip", "")}[ptype]
    parts = [f"{doc.file}: {ptype} {where}".rstrip() + f", cluster {cfg['cluster_name']}"]
    if ptype == "local":
        n = len(provider.get("worker_ips", []))
        parts.append(f"head {fmt_resources(head_res)}, {n} worker{'s' * (n != 1)} {fmt_resources(worker_res)}")
    else:
        head = prepared["head_node_type"]
        nts = prepared["available_node_types"]
        parts.append(f"head {head} {_machine(ptype, nts[head])} {fmt_resources(nts[head]['resources'])}")
        workers = [f"{n} {_machine(ptype, t)} {fmt_resources(t['resources'])} x{t['min_workers']}-{t['max_workers']}"
                   for n, t in nts.items() if n != head]
        parts.append("workers " + (", ".join(workers) or "none") + f" (max_workers {prepared['max_workers']})")
    parts.append(f"auth {auth}")
    parts.append(f"dashboard {dash}")
    parts.append(f"mlflow {mlflow}" if mlflow else "no mlflow server")
    return "; ".join(parts)


def _guess_key(message: str) -> KeyPath:
    """Ray's preparation errors name keys in prose; point at the first top-level key they mention."""
    for key in ("head_node_type", "available_node_types", "max_workers", "worker_ips", "head_ip", "docker"):
        if key in message:
            return ("provider", key) if key in ("worker_ips", "head_ip") else (key,)
    return ()


def fmt_resources(res: dict) -> str:
    """`{CPU: 8, GPU: 1}` as the summaries print it."""
    return "{" + ", ".join(f"{k}: {v:g}" if isinstance(v, (int, float)) else f"{k}: {v}" for k, v in res.items()) + "}"


def _machine(ptype: str, nt: dict) -> str:
    nc = nt.get("node_config", {})
    return str(nc.get("InstanceType") if ptype == "aws" else nc.get("machineType", "?"))


def _check_node_types(doc: _Doc, cfg: dict, ptype: str) -> None:
    """Declared {CPU, GPU} consistent with the machine, where weakseg knows the machine."""
    for name, nt in cfg["available_node_types"].items():
        base = ("available_node_types", name)
        res = nt["resources"]
        nc = nt.get("node_config", {})
        if ptype == "aws":
            mtype_key, table, gpus = "InstanceType", AWS_INSTANCES, None
        else:
            mtype_key, table = "machineType", GCP_MACHINES
            accs = nc.get("guestAccelerators") or []
            gpus = sum(int(a.get("acceleratorCount", 0)) for a in accs if isinstance(a, dict)) if accs else None
        mtype = nc.get(mtype_key)
        if not isinstance(mtype, str):
            doc.fail(base + ("node_config",), f"needs node_config.{mtype_key}")
        if mtype in table:
            cpus, gpus_machine = table[mtype]
            gpus = gpus_machine if gpus is None else gpus
            if gpus != gpus_machine:
                doc.fail(base + ("node_config", "guestAccelerators"),
                         f"{gpus} GPU(s) declared but {mtype} has {gpus_machine}")
            if res["CPU"] > cpus:
                doc.fail(base + ("resources", "CPU"), f"{res['CPU']} CPUs declared but {mtype} has {cpus} vCPUs")
        if gpus is not None and res["GPU"] != gpus:
            doc.fail(base + ("resources", "GPU"), f"{res['GPU']} declared but the node has {gpus} GPU(s) "
                                                  f"({mtype})")
        if ptype == "gcp" and (gpus or 0) > 0:
            sched = nc.get("scheduling") or {}
            items = sched if isinstance(sched, list) else [sched]
            if not any(isinstance(s, dict) and s.get("onHostMaintenance") == "TERMINATE" for s in items):
                doc.fail(base + ("node_config", "scheduling") if "scheduling" in nc else base + ("node_config",),
                         "GPU VMs cannot live-migrate: set scheduling.onHostMaintenance: TERMINATE")


def _check_images(doc: _Doc, cfg: dict, ptype: str) -> None:
    """Images known not to run the pinned torch (CUDA 13 build: glibc >= 2.28, NVIDIA driver >= 580)."""
    for name, nt in (cfg.get("available_node_types") or {}).items():
        nc = nt.get("node_config") or {}
        base = ("available_node_types", name, "node_config")
        if ptype == "aws":
            ami = str(nc.get("ImageId", "")).strip()
            if ami.lower() in ("", "latest_dlami"):
                doc.fail(base + ("ImageId",) if "ImageId" in nc else base,
                         f"{ami or 'no ImageId'}: Ray 2.60 resolves this to an Ubuntu 18.04 Deep Learning AMI "
                         "(glibc 2.27, CUDA 11) on which the pinned torch does not install; use a current Ubuntu "
                         "22.04/24.04 DLAMI, e.g. resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
                         "base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id")
        elif ptype == "gcp":
            for i, disk in enumerate(nc.get("disks") or []):
                image = str(((disk or {}).get("initializeParams") or {}).get("sourceImage", ""))
                driver = re.search(r"nvidia-(\d{3})\b", image)
                old_os = re.search(r"ubuntu-(1604|1804)|debian-(9|10)\b", image)
                if (driver and int(driver.group(1)) < OLD_DRIVER) or old_os:
                    doc.fail(base + ("disks", i, "initializeParams", "sourceImage"),
                             f"{image.rsplit('/', 1)[-1]}: the pinned torch's CUDA 13 build needs NVIDIA driver >= "
                             f"{OLD_DRIVER} and glibc >= 2.28; pick a current Deep Learning VM family "
                             "(cluster/README.md, section 2)")
    docker = cfg.get("docker") or {}
    for key in ("image", "head_image", "worker_image"):
        image = docker.get(key)
        if isinstance(image, str) and image:
            _check_ray_image(doc, ("docker", key), image)


def _check_ray_image(doc: _Doc, where: KeyPath, image: str) -> None:
    """A rayproject/ray image must be tagged with this Ray's version (`ray up`/`job submit` need the same Ray)."""
    import ray

    repo, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "latest")
    if repo.split("/")[-1] == "ray" and repo.rsplit("/", 1)[0].endswith("rayproject"):
        if tag == "latest" or not tag.startswith(ray.__version__ + "-") and tag != ray.__version__:
            doc.fail(where, f"{image}: use a rayproject/ray tag of Ray {ray.__version__} (the version here and "
                            f"in cluster/constraints.txt), e.g. rayproject/ray:{ray.__version__}-py311-gpu")


def _check_resources_declared(doc: _Doc, types: dict) -> None:
    """Explicit {CPU, GPU} per node type: `weakseg search` checks a trial fits one before launching."""
    for name, nt in types.items():
        base = ("available_node_types", name)
        res = nt.get("resources") if isinstance(nt, dict) else None
        if not res or not isinstance(res, dict):
            doc.fail(base + ("resources",) if isinstance(nt, dict) and "resources" in nt else base,
                     'needs explicit resources, e.g. {"CPU": 8, "GPU": 1}: `weakseg search` checks a trial fits '
                     "a node type before launching, and Ray autodetects resources only on AWS")
        for k in ("CPU", "GPU"):
            if k not in res:
                doc.fail(base + ("resources",), f"declare {k} explicitly (0 if none)")


def _ray_start(cmds: list[str]) -> list[tuple[int, str]]:
    return [(i, c) for i, c in enumerate(cmds or []) if re.search(r"\bray\s+start\b", c)]


def _flag(cmd: str, *names: str) -> str | None:
    for n in names:
        m = re.search(rf"(?:^|\s){re.escape(n)}(?:=|\s+)(['\"]?)([^\s'\";]+)\1", cmd)
        if m:
            return m.group(2)
    return None


def _check_local(doc: _Doc, prepared: dict) -> tuple[dict, dict]:
    """On-prem nodes have no node types to declare resources in: `ray start` must say them."""
    out = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = _ray_start(prepared[key])
        if not starts:
            doc.fail((key,), "no `ray start` command")
        i, cmd = starts[-1]
        res = {}
        for flag, name in (("--num-cpus", "CPU"), ("--num-gpus", "GPU")):
            v = _flag(cmd, flag)
            if v is None:
                doc.fail((key, i), f"`ray start` needs an explicit {flag}: on-prem nodes declare their resources "
                                   "there (Ray's local provider has no node types), and `weakseg search` checks a "
                                   "trial fits before launching")
            try:
                res[name] = int(v)
            except ValueError:
                doc.fail((key, i), f"{flag}={v}: not an integer")
        out.append(res)
    return out[0], out[1]


def _check_auth(doc: _Doc, cfg: dict, prepared: dict) -> str:
    """RAY_AUTH_MODE set in every `ray start` (same mode everywhere); with tokens, the token reaches every node."""
    modes = set()
    token_inline = True
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for i, cmd in _ray_start(prepared[key]):
            m = re.search(r"\bRAY_AUTH_MODE=(['\"]?)(\w+)\1", cmd)
            if not m:
                doc.fail((key, i) if key in cfg else (key,),
                         "`ray start` runs without RAY_AUTH_MODE: set it explicitly in the same command "
                         "(`RAY_AUTH_MODE=token ray start ...`); each command runs in its own shell, and Ray 2.60 "
                         "turns token auth on implicitly only in some paths")
            if m.group(2) not in AUTH_MODES:
                doc.fail((key, i), f"RAY_AUTH_MODE={m.group(2)}: expected one of {', '.join(AUTH_MODES)}")
            modes.add(m.group(2))
            token_inline &= bool(re.search(r"\bRAY_AUTH_TOKEN(_PATH)?=", cmd))
    if len(modes) > 1:
        doc.fail(("worker_start_ray_commands",), f"RAY_AUTH_MODE differs between head and workers ({sorted(modes)})")
    mode = modes.pop()
    if mode == "token" and not token_inline:
        mounts = prepared.get("file_mounts") or {}
        if not any(str(remote).rstrip("/").endswith(".ray/auth_token") for remote in mounts):
            doc.fail(("file_mounts",), "RAY_AUTH_MODE=token but no token reaches the nodes: mount it, e.g. "
                                       '"~/.ray/auth_token": "~/.ray/auth_token" (made by `ray get-auth-token '
                                       "--generate`), or set RAY_AUTH_TOKEN_PATH in each `ray start`")
    return mode


def _check_dashboard(doc: _Doc, prepared: dict) -> str:
    starts = _ray_start(prepared["head_start_ray_commands"])
    if not starts:
        doc.fail(("head_start_ray_commands",), "no `ray start --head` command")
    i, cmd = starts[-1]
    if (_flag(cmd, "--include-dashboard") or "").lower() == "false":
        return "off"
    host = _flag(cmd, "--dashboard-host")
    where = ("head_start_ray_commands", i) if "head_start_ray_commands" in doc.data else ("head_start_ray_commands",)
    if host is None:
        doc.fail(where, "set --dashboard-host=127.0.0.1 explicitly (Ray's own cluster configs use 0.0.0.0); "
                        "reach it with `ray dashboard CONFIG` or `ssh -L 8265:127.0.0.1:8265`")
    if host not in LOOPBACK:
        doc.fail(where, f"--dashboard-host={host} exposes the dashboard (which runs arbitrary jobs) beyond the head: "
                        "use 127.0.0.1 and SSH port forwarding")
    return f"{host}:{_flag(cmd, '--dashboard-port') or 8265}"


def _check_mlflow(doc: _Doc, prepared: dict) -> str | None:
    found = None
    for key in ("setup_commands", "head_setup_commands", "head_start_ray_commands", "worker_setup_commands",
                "worker_start_ray_commands", "initialization_commands"):
        for i, cmd in enumerate(prepared.get(key) or []):
            if not re.search(r"\bmlflow\s+(server|ui)\b", cmd):
                continue
            if key == "setup_commands":
                continue  # merged into head_setup_commands and worker_setup_commands by Ray
            where = (key, i) if key in doc.data else (key,)
            if key.startswith("worker"):
                doc.fail(where, "the MLflow server belongs on the head (the driver, which alone talks to MLflow, "
                                "runs there): move it to head_setup_commands or head_start_ray_commands")
            host = _flag(cmd, "--host", "-h")
            if host is None:
                doc.fail(where, "bind the MLflow server explicitly: --host 127.0.0.1")
            if host not in LOOPBACK:
                doc.fail(where, f"--host {host} exposes the MLflow server beyond the head: use 127.0.0.1 and "
                                "`ssh -L 5000:127.0.0.1:5000`")
            found = f"{host}:{_flag(cmd, '--port', '-p') or 5000}"
    return found


def _open_cidr(rule: dict) -> bool:
    return any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges") or []) or any(
        r.get("CidrIpv6") == "::/0" for r in rule.get("Ipv6Ranges") or [])


def _check_aws_network(doc: _Doc, cfg: dict) -> None:
    perms = ((cfg["provider"].get("security_group") or {}).get("IpPermissions")) or []
    for i, rule in enumerate(perms):
        if isinstance(rule, dict) and _open_cidr(rule):
            doc.fail(("provider", "security_group", "IpPermissions", i),
                     "opens a port to the whole internet (0.0.0.0/0): allow only your own CIDR")
    for name, nt in cfg["available_node_types"].items():
        if "SecurityGroupIds" not in (nt.get("node_config") or {}):
            doc.fail(("available_node_types", name, "node_config"),
                     "set SecurityGroupIds to a group you created (SSH from your CIDR only, all traffic within the "
                     "group; see cluster/README.md): without it Ray creates one that admits SSH from 0.0.0.0/0")


def _check_gcp_network(doc: _Doc, cfg: dict) -> None:
    for name, nt in cfg["available_node_types"].items():
        if "networkInterfaces" not in (nt.get("node_config") or {}):
            doc.fail(("available_node_types", name, "node_config"),
                     "set networkInterfaces to a subnetwork whose firewall you control (SSH from your CIDR only; "
                     "see cluster/README.md): without it Ray picks the project's first subnetwork, usually the "
                     "`default` network whose default-allow-ssh rule admits 0.0.0.0/0")


# ------------------------------------------------------------------------------ KubeRay


def _quantity(v: Any) -> float:
    """A Kubernetes quantity of CPUs or GPUs ("8", 8, "500m") as a number."""
    s = str(v).strip()
    try:
        return float(s[:-1]) / 1000 if s.endswith("m") else float(s)
    except ValueError:
        return math.nan


def _strict(schema: Any) -> Any:
    """The CRD schema with undeclared fields rejected, as the API server does under kubectl's strict
    field validation (the CRD itself prunes them silently)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _crd_schema() -> dict:
    return _strict(json.loads((SCHEMAS / "ray.io_rayclusters.v1.json").read_text()))


def _check_crd_schema(doc: _Doc) -> None:
    """The RayCluster against KubeRay's own CRD schema (vendored, see weakseg/cluster/schemas/README.md)."""
    import jsonschema

    schema = _crd_schema()
    # Unknown fields first: a misspelt key also shows up as a missing required one.
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc.data),
                    key=lambda e: (e.validator != "additionalProperties", [str(p) for p in e.absolute_path]))
    if not errors:
        return
    e = errors[0]
    where = tuple(e.absolute_path)
    if e.validator == "additionalProperties":
        sub = schema
        for p in where:
            sub = sub.get("items", {}) if isinstance(p, int) else sub.get("properties", {}).get(p, {})
        known = list(sub.get("properties", {}))
        node = doc.data
        for p in where:
            node = node[p]
        unknown = [k for k in node if k not in known]
        key = unknown[0] if unknown else "?"
        hint = KUBERAY_RENAMED.get(key) if where == ("spec",) else None
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        msg = f"unknown field (KubeRay v1.7 RayCluster CRD)" + (
            f"; now {hint}" if hint else f"; did you mean {close[0]}?" if close else "")
        doc.fail(where + (key,), msg)
    hint = ""
    if e.validator == "type" and e.validator_value == "string" and not isinstance(e.instance, (dict, list)):
        hint = f'; must be quoted, e.g. "{e.instance}"'
    doc.fail(where, f"{e.message} (KubeRay v1.7 RayCluster CRD){hint}")


def _validate_kuberay(path: Path, docs: list[_Doc]) -> str:
    clusters = []
    for d in docs:
        if not isinstance(d.data, dict) or "kind" not in d.data or "apiVersion" not in d.data:
            d.fail((), "every document of a Kubernetes manifest needs apiVersion and kind")
        if d.data["kind"] == "RayCluster":
            clusters.append(d)
    if len(clusters) != 1:
        raise UserError(f"{path}:1: expected exactly one `kind: RayCluster` document, found {len(clusters)}")
    doc = clusters[0]
    rc = doc.data
    if rc["apiVersion"] != "ray.io/v1":
        doc.fail(("apiVersion",), f"{rc['apiVersion']!r}: KubeRay >= 1.0 serves ray.io/v1 (v1alpha1 is gone)")
    _check_crd_schema(doc)
    name = (rc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not name:
        doc.fail(("metadata",), "needs metadata.name")
    spec = rc.get("spec")
    if not isinstance(spec, dict):
        doc.fail(("spec",), "needs a spec with headGroupSpec and workerGroupSpecs")
    auth_opt = (spec.get("authOptions") or {}).get("mode")
    if "headGroupSpec" not in spec:
        doc.fail(("spec",), "needs headGroupSpec")
    head = spec["headGroupSpec"]
    hp = ("spec", "headGroupSpec")
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        doc.fail(hp + ("serviceType",), f"{head['serviceType']} exposes the head outside the Kubernetes cluster: "
                                        "use ClusterIP and `kubectl port-forward`")
    if head.get("enableIngress"):
        doc.fail(hp + ("enableIngress",), "an ingress exposes the dashboard: use `kubectl port-forward`")
    head_params = _start_params(doc, head, hp)
    host = head_params.get("dashboard-host")
    if host is None:
        doc.fail(hp + ("rayStartParams",), 'set dashboard-host: "127.0.0.1" explicitly (KubeRay defaults to '
                                           "0.0.0.0); reach it with `kubectl port-forward`")
    if host not in LOOPBACK:
        doc.fail(hp + ("rayStartParams", "dashboard-host"), f"{host} exposes the dashboard: use 127.0.0.1")
    head_res, modes = _group_resources(doc, head, hp, head_params, auth_opt)
    mlflow = None
    for j, c in enumerate(head["template"]["spec"]["containers"]):
        text = " ".join(str(x) for x in (c.get("command") or []) + (c.get("args") or []))
        if re.search(r"\bmlflow\s+(server|ui)\b", text):
            cp = hp + ("template", "spec", "containers", j)
            h = _flag(text, "--host", "-h")
            if h not in LOOPBACK:
                doc.fail(cp, "bind the MLflow server to 127.0.0.1 (--host 127.0.0.1); reach it with "
                             "`kubectl port-forward`")
            mlflow = f"{h}:{_flag(text, '--port', '-p') or 5000}"
    groups = spec.get("workerGroupSpecs") or []
    if not isinstance(groups, list) or not groups:
        doc.fail(("spec", "workerGroupSpecs"), "needs at least one worker group (the GPU workers that run trials)")
    summary_groups = []
    for g_i, g in enumerate(groups):
        gp = ("spec", "workerGroupSpecs", g_i)
        if not isinstance(g.get("groupName"), str):
            doc.fail(gp, "needs groupName")
        lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1)
        for k, v in (("minReplicas", lo), ("maxReplicas", hi), ("replicas", g.get("replicas", lo))):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                doc.fail(gp + (k,), f"{v!r}: must be a non-negative integer")
        if lo > hi:
            doc.fail(gp + ("minReplicas",), f"minReplicas {lo} exceeds maxReplicas {hi}")
        params = _start_params(doc, g, gp)
        if "num-gpus" not in params:
            doc.fail(gp + ("rayStartParams",), 'declare num-gpus explicitly ("0" for a CPU group): `weakseg search` '
                                               "checks a trial fits a node before launching")
        res, gmodes = _group_resources(doc, g, gp, params, auth_opt)
        modes |= gmodes
        summary_groups.append(f"{g['groupName']} {fmt_resources(res)} x{lo}-{hi}")
    if len(modes) > 1:
        doc.fail(("spec",), f"RAY_AUTH_MODE differs between the head and worker groups ({sorted(modes)})")
    mode = modes.pop() if modes else auth_opt
    version = spec.get("rayVersion", "?")
    return (f"{path}: kuberay RayCluster {name} (ray {version}); head {fmt_resources(head_res)}; workers "
            f"{', '.join(summary_groups)}; auth {mode}; dashboard {host}; "
            + (f"mlflow {mlflow}" if mlflow else "no mlflow server"))


def _start_params(doc: _Doc, group: dict, gp: KeyPath) -> dict[str, str]:
    params = group.get("rayStartParams")
    if params is None:
        return {}
    if not isinstance(params, dict):
        doc.fail(gp + ("rayStartParams",), "must be a mapping of `ray start` options to strings")
    for k, v in params.items():
        if not isinstance(v, str):
            doc.fail(gp + ("rayStartParams", k), f"{v!r} must be quoted, e.g. \"{v}\": KubeRay's rayStartParams is "
                                                 "map[string]string and the API server rejects other types")
    return params


def _group_resources(doc: _Doc, group: dict, gp: KeyPath, params: dict[str, str],
                     auth_opt: str | None) -> tuple[dict[str, float], set[str]]:
    """The Ray container's limits, checked against rayStartParams; its RAY_AUTH_MODE."""
    tp = gp + ("template",)
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers")
    if not isinstance(containers, list) or not containers or not isinstance(containers[0], dict):
        doc.fail(tp, "needs template.spec.containers with the Ray container first")
    c = containers[0]
    cp = tp + ("spec", "containers", 0)
    if not c.get("image"):
        doc.fail(cp, "the Ray container needs an image (weakseg's, see cluster/Dockerfile)")
    _check_ray_image(doc, cp + ("image",), str(c["image"]))
    limits = (c.get("resources") or {}).get("limits")
    if not isinstance(limits, dict):
        doc.fail(cp + ("resources",) if "resources" in c else cp,
                 "needs resources.limits (cpu, memory; nvidia.com/gpu on GPU groups): KubeRay derives the Ray "
                 "node's resources from them")
    lp = cp + ("resources", "limits")
    for k in ("cpu", "memory"):
        if k not in limits:
            doc.fail(lp, f"needs a {k} limit")
    cpus = _quantity(params.get("num-cpus", limits["cpu"]))
    gpus_param = params.get("num-gpus")
    gpu_limit = limits.get("nvidia.com/gpu")
    if gpus_param is not None:
        try:
            gpus = int(gpus_param)
        except ValueError:
            doc.fail(gp + ("rayStartParams", "num-gpus"), f"{gpus_param!r}: not an integer")
        if gpus > 0 and gpu_limit is None:
            doc.fail(lp, f"rayStartParams num-gpus is {gpus} but the container has no nvidia.com/gpu limit: "
                         "Kubernetes would schedule it without a GPU")
        if gpu_limit is not None and int(_quantity(gpu_limit)) != gpus:
            doc.fail(lp + ("nvidia.com/gpu",), f"{gpu_limit} GPU(s) but rayStartParams num-gpus is {gpus}")
    else:
        gpus = int(_quantity(gpu_limit)) if gpu_limit is not None else 0
    modes = set()
    env = {e.get("name"): e for e in c.get("env") or [] if isinstance(e, dict)}
    if "RAY_AUTH_MODE" in env:
        value = env["RAY_AUTH_MODE"].get("value")
        if value not in AUTH_MODES:
            doc.fail(cp + ("env",), f"RAY_AUTH_MODE={value!r}: expected one of {', '.join(AUTH_MODES)}")
        modes.add(value)
        if value == "token" and auth_opt != "token" and not ({"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(env)):
            doc.fail(cp + ("env",), "RAY_AUTH_MODE=token needs the token: RAY_AUTH_TOKEN from a Secret "
                                    "(valueFrom.secretKeyRef)")
    elif auth_opt is None:
        doc.fail(cp + ("env",) if "env" in c else cp,
                 "set RAY_AUTH_MODE explicitly in the Ray container's env (token, with RAY_AUTH_TOKEN from a "
                 "Secret), or spec.authOptions.mode")
    return {"CPU": cpus, "GPU": gpus}, modes
