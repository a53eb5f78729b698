"""Test-only fault injection for `weakseg search` subprocesses (never shipped in the package).

Put this folder on PYTHONPATH and describe the faults in WEAKSEG_FAULTS (JSON); every Python process
started with that environment (the search driver, Ray's raylet and its trial workers, which inherit the
driver's or the node's environment) then wraps `weakseg.engine.train_step` as soon as `weakseg.engine`
is imported. Nothing happens without WEAKSEG_FAULTS, and nothing is imported eagerly, so Ray's helper
processes start as fast as without it.

    {
      "log": "/tmp/x/steps.jsonl",          # optional: one JSON line per train_step call
      "markers": "/tmp/x/markers",          # where `once` faults record that they fired
      "faults": [
        {"id": "crash", "match": {"loss.lam": 0.2}, "at": 3, "action": "raise", "once": true},
        {"id": "nan", "match": {"loss.lam": 0.4}, "at": 3, "action": "nan", "once": true}
      ]
    }

`match`: training-config keys and the values a trial must have (all must hold). `at`: the training
iteration *before* the step (`state.iteration`), so `at: 3` hits the 4th step; `"any"`: every step. `raise` raises
`InjectedFault` before the step; `nan` runs the real step and returns a NaN loss, which the engine's
finiteness check turns into `TrainingDiverged`; `sleep` waits `seconds` before the step (a slow trial,
for signals that must land mid-trial). `once`: fire on the first attempt only (a marker file
created with O_EXCL survives the trial's process), so a retry shows whether it resumed and how.
The log lines record pid, session id and each call's iteration: a retried attempt is visible as the
iteration sequence starting again, at the checkpoint's iteration.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import sys
import time

ENV = "WEAKSEG_FAULTS"


class InjectedFault(RuntimeError):
    """The exception a `raise` fault raises: its name is what the tests look for in error reports."""


def _load_plan() -> dict | None:
    raw = os.environ.get(ENV)
    if not raw:
        return None
    return json.loads(raw)


def _matches(flat: dict, match: dict) -> bool:
    return all(k in flat and flat[k] == v for k, v in match.items())


def _first_time(markers: str, fault_id: str) -> bool:
    """True exactly once per fault id, across processes and attempts."""
    os.makedirs(markers, exist_ok=True)
    try:
        fd = os.open(os.path.join(markers, f"{fault_id}.fired"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {time.time()}\n")
    return True


def _append(path: str, record: dict) -> None:
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)  # one write of a short line with O_APPEND: lines of concurrent trials don't interleave
    finally:
        os.close(fd)


def _patch(engine) -> None:
    plan = _load_plan()
    if plan is None or getattr(engine, "_weakseg_faults_patched", False):
        return
    real = engine.train_step
    faults = plan.get("faults", [])
    log = plan.get("log")
    markers = plan.get("markers") or os.path.dirname(log or ".")

    def train_step(model, batch, state, cfg, device, amp, channels_last):
        flat = cfg.flat()
        it = state.iteration
        if log:
            _append(log, {"pid": os.getpid(), "sid": os.getsid(0), "lam": flat.get("loss.lam"),
                          "variant": flat.get("loss.variant"), "it": it, "t": time.time()})
        for f in faults:
            if f["at"] not in ("any", it) or not _matches(flat, f.get("match", {})):
                continue
            if f.get("once", False) and not _first_time(markers, f["id"]):
                continue
            if f["action"] == "sleep":
                time.sleep(float(f["seconds"]))
                continue
            if f["action"] == "raise":
                raise InjectedFault(f"injected fault {f['id']!r} at iteration {it}")
            if f["action"] == "nan":
                parts = real(model, batch, state, cfg, device, amp, channels_last)
                nan = parts.total.detach() * float("nan")
                return type(parts)(total=nan, cls=nan, neighb=parts.neighb, lam=parts.lam)
            raise ValueError(f"{ENV}: unknown action {f['action']!r}")
        return real(model, batch, state, cfg, device, amp, channels_last)

    engine.train_step = train_step
    engine._weakseg_faults_patched = True


class _PatchEngineOnImport(importlib.abc.MetaPathFinder):
    """Finds `weakseg.engine` through the other finders and patches the module right after it executes."""

    def find_spec(self, name, path, target=None):
        if name != "weakseg.engine":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        loader.exec_module = exec_and_patch  # this spec's loader instance only
        return spec


if os.environ.get(ENV) and not any(isinstance(f, _PatchEngineOnImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _PatchEngineOnImport())
