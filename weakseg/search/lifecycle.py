"""A search's life on the driver: one driver per experiment, the space it started with, its stored state,
and interruption as an outcome.

SearchLock     <storage_path>/<name>.lock, created exclusively (O_EXCL on local and NFS folders; write then
               read back on object stores), refreshed every HEARTBEAT_S; a lock whose driver is gone (same
               host, dead pid) or silent for STALE_S is stale, named, and replaced.
space record   <storage_path>/<name>/weakseg-space.json: the resolved space the search started with;
               `--resume` diffs the current one against it (`space_changes`).
check_state    before `Tuner.restore`: the state files must parse (a disk-full write truncates them, and Ray
               would otherwise log "Failed to restore the run state" and start a fresh search under the old
               name) and, on local storage, must not be writable by other users (Ray unpickles tuner.pkl).
Interruption   SIGINT / SIGTERM are recorded and turned into Ray Tune's own graceful stop (SIGUSR1), so the
               experiment state is saved with the cut trials still unfinished.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from weakseg.errors import UserError

SPACE_RECORD = "weakseg-space.json"
SAFE_CHANGES = ("settings.samples",)  # applied by --apply-safe-changes; anything else is refused


# ------------------------------------------------------------------------------------------ the lock


def _local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SearchLock:
    """One driver per experiment, on local and shared storage (see the module docstring)."""

    HEARTBEAT_S = 30.0
    STALE_S = 180.0

    def __init__(self, exp_path: str, name: str):
        self.location = exp_path.rstrip("/") + ".lock"
        self.name = name
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.replaced: str | None = None  # the stale lock this one replaced, described
        self._made: list[Path] = []

    def _info(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                "started": getattr(self, "_started", time.strftime("%Y-%m-%d %H:%M:%S")),
                "heartbeat": time.time(), "command": " ".join(sys.argv)}

    # -- storage access: a local (or NFS) path, else the pyarrow file system Ray Tune uses
    def _fs(self):
        from weakseg.search.run import _experiment_fs

        return _experiment_fs(self.location)

    def _create(self, data: bytes) -> bool:
        if _local(self.location):
            path = Path(self.location.removeprefix("file://"))
            self._made = [p for p in path.parents if not p.exists()]  # removed again on release if still empty
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        import pyarrow.fs

        fs, path = self._fs()
        if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
            return False
        with fs.open_output_stream(path) as f:
            f.write(data)
        time.sleep(1.0)  # object stores have no exclusive create: the last writer wins, so read it back
        return self._read().get("token") == self.token

    def _read(self) -> dict[str, Any]:
        try:
            if _local(self.location):
                raw = Path(self.location.removeprefix("file://")).read_bytes()
            else:
                fs, path = self._fs()
                with fs.open_input_stream(path) as f:
                    raw = f.read()
            return json.loads(raw or b"{}")
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {"corrupt": True}

    def _write(self, data: bytes) -> None:
        if _local(self.location):
            from weakseg.io import atomic_write_bytes

            atomic_write_bytes(Path(self.location.removeprefix("file://")), data)
        else:
            fs, path = self._fs()
            with fs.open_output_stream(path) as f:
                f.write(data)

    def _remove(self) -> None:
        try:
            if _local(self.location):
                Path(self.location.removeprefix("file://")).unlink(missing_ok=True)
            else:
                fs, path = self._fs()
                fs.delete_file(path)
        except OSError:
            pass

    @staticmethod
    def describe(info: dict[str, Any]) -> str:
        return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}"

    def stale_reason(self, info: dict[str, Any]) -> str | None:
        """Why a lock's driver is gone, or None while it may still run."""
        if info.get("corrupt") or not info:
            return "the lock file is empty or unreadable"
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) \
                and not _pid_alive(info["pid"]):
            return f"its driver (pid {info['pid']}) no longer runs"
        age = time.time() - float(info.get("heartbeat", 0))
        if age > self.STALE_S:
            return f"its driver has not refreshed it for {age:.0f} s"
        return None

    def acquire(self) -> None:
        self._started = time.strftime("%Y-%m-%d %H:%M:%S")
        for _ in range(2):
            if self._create(json.dumps(self._info()).encode()):
                break
            held = self._read()
            reason = self.stale_reason(held)
            if reason is None:
                raise UserError(
                    f"search {self.name!r} is already running ({self.describe(held)}; lock {self.location}): "
                    "wait for it to end, stop it, or give this search another `name`"
                )
            self.replaced = f"{self.describe(held)}: {reason}"
            print(f"removing a stale lock of search {self.name!r} ({self.replaced}; {self.location})", flush=True)
            self._remove()
        else:
            raise UserError(f"search {self.name!r}: another driver took the lock {self.location} at the same moment")
        self._thread = threading.Thread(target=self._beat, name="weakseg-search-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            try:
                if self._read().get("token") not in (self.token, None):
                    print(f"warning: the lock {self.location} was taken over by another driver", flush=True)
                    return
                self._write(json.dumps(self._info()).encode())
            except Exception as e:  # a heartbeat that cannot be written is reported, not fatal
                print(f"warning: cannot refresh the lock {self.location} ({e})", flush=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._read().get("token") == self.token:
            self._remove()
        for folder in self._made:  # a search refused before it began leaves no empty storage folders
            try:
                folder.rmdir()
            except OSError:
                break


# ----------------------------------------------------------------------------- the space it started with


def space_record(space: Any) -> dict[str, str]:
    """The resolved space, flat: what a resumed search must agree with (values as strings)."""
    from weakseg.search.run import _settings_params

    out = {f"config.{k}": repr(v) for k, v in space.base_config.flat().items()}
    out.update({f"params.{p.key}": p.describe() for p in space.params})
    out.update({f"settings.{k}": repr(v) for k, v in _settings_params(space).items()})
    out["export"] = repr(space.export)
    return out


def write_space_record(exp_path: str, space: Any) -> None:
    from weakseg.search.run import _experiment_fs

    data = json.dumps(space_record(space), indent=1, sort_keys=True).encode()
    if _local(exp_path):
        from weakseg.io import atomic_write_bytes

        atomic_write_bytes(Path(exp_path.removeprefix("file://")) / SPACE_RECORD, data)
    else:
        fs, path = _experiment_fs(exp_path)
        with fs.open_output_stream(f"{path}/{SPACE_RECORD}") as f:
            f.write(data)


def read_space_record(exp_path: str) -> dict[str, str] | None:
    from weakseg.search.run import _experiment_fs

    try:
        fs, path = _experiment_fs(exp_path)
        with fs.open_input_stream(f"{path}/{SPACE_RECORD}") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"--resume: {exp_path}/{SPACE_RECORD} is unreadable ({e})") from None


def space_changes(old: dict[str, str], new: dict[str, str]) -> dict[str, tuple[str, str]]:
    """key -> (before, after) for every key that differs; a missing side is '(none)'."""
    return {k: (old.get(k, "(none)"), new.get(k, "(none)")) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)}


def check_space_changes(changes: dict[str, tuple[str, str]], apply_safe: bool, space: Any) -> dict[str, tuple]:
    """Refuse any change unless every one is safe and --apply-safe-changes was given; returns those to apply."""
    if not changes:
        return {}
    diff = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in changes.items())
    unsafe = [k for k in changes if k not in SAFE_CHANGES]
    if not unsafe and space.settings.sampler == "tpe":
        a, b = (int(x) for x in changes["settings.samples"])
        if b < a:
            unsafe = ["settings.samples"]  # fewer samples than already planned: trials may already exist
    if unsafe or not apply_safe:
        why = (f"only {', '.join(SAFE_CHANGES)} (more samples, TPE sampler) can change, with --apply-safe-changes"
               if unsafe else "pass --apply-safe-changes to apply it")
        raise UserError(f"--resume: the space {space.path} differs from the one the search started with ({diff}); "
                        f"{why}, or undo the edit, or --restart")
    return changes


# ----------------------------------------------------------------------------------- the stored state


def check_state(exp_path: str) -> None:
    """Refuse to resume from state Ray could not restore, or (local storage) that others could have written."""
    from weakseg.search.run import _experiment_fs

    fs, path = _experiment_fs(exp_path)
    import pyarrow.fs

    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=False))
    names = {Path(i.path).name: i for i in infos}
    states = sorted(n for n in names if n.startswith("experiment_state-") and n.endswith(".json"))
    if "tuner.pkl" not in names or names["tuner.pkl"].size == 0:
        raise UserError(f"--resume: {exp_path}/tuner.pkl is missing or empty; this search cannot be resumed "
                        "(--restart starts it over; MLflow keeps its runs)")
    if not states:
        raise UserError(f"--resume: {exp_path} holds no experiment_state-*.json; this search cannot be resumed "
                        "(--restart starts it over; MLflow keeps its runs)")
    newest = states[-1]  # what Ray restores (names hold a sortable timestamp)
    try:
        with fs.open_input_stream(f"{path}/{newest}") as f:
            json.loads(f.read())
    except (OSError, ValueError) as e:
        raise UserError(f"--resume: {exp_path}/{newest} is damaged ({str(e).splitlines()[0][:120]}; a full disk "
                        "leaves it so); this search cannot be resumed: free space and --restart it "
                        "(MLflow keeps its runs)") from None
    if _local(exp_path):
        check_owner(Path(path), [Path(path) / n for n in names if n.endswith((".pkl", ".json"))])


def check_owner(folder: Path, files: list[Path]) -> None:
    """Ray unpickles tuner.pkl and the searcher state on resume: code in them runs as this user. Refuse files
    (and their folder) owned by someone else or writable by group/others."""
    uid = os.getuid()
    for p in [folder, *files]:
        st = p.stat()
        loose = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if p.is_dir() and loose and st.st_mode & stat.S_ISVTX and st.st_uid == uid:
            loose = 0  # sticky folder owned by us: others cannot replace our files
        if st.st_uid != uid or loose:
            who = f"owned by uid {st.st_uid}" if st.st_uid != uid else f"mode {stat.filemode(st.st_mode)}"
            raise UserError(f"--resume: {p} is {who}: Ray would unpickle (run) what others could have written "
                            f"there; refusing to resume (fix with chmod go-w / chown, if you trust its content)")


# ------------------------------------------------------------------------------------------ interruption


class Interruption:
    """SIGINT and SIGTERM become Ray Tune's graceful stop (its SIGUSR1 handler): the experiment state is
    saved with the cut trials unfinished, and `signal` says which one came. A second signal aborts.

    When the graceful stop cannot end within GRACE_S (SIGTERM sent to the whole process group also
    stops Ray's own GCS and raylet, and the driver's Ray core then exits after 60 s), `abandon(signal)`
    runs on a helper thread (close the runs, write the status, print the resume hint) and the
    process exits 128 + signal: the Ray state is the last one saved, as after a SIGKILL."""

    GRACE_S = 30.0

    def __init__(self, abandon: Callable[[str], None] | None = None) -> None:
        self.signal: str | None = None
        self.abandon = abandon
        self._previous: dict[int, Any] = {}
        self._ended = threading.Event()

    def __enter__(self) -> "Interruption":
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours replaces Ray Tune's, which exits looking finished
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt  # a second signal: stop now
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal} received: stopping the search; its state is saved for --resume "
              "(send it again to stop at once)", file=sys.stderr, flush=True)
        if self.abandon is not None:
            threading.Thread(target=self._watchdog, name="weakseg-interruption", daemon=True).start()
        if not callable(signal.getsignal(signal.SIGUSR1)):
            raise KeyboardInterrupt  # Ray Tune's handler is not installed yet (or any more): nothing to save
        os.kill(os.getpid(), signal.SIGUSR1)  # Ray Tune's stop: ends the loop, saves the state, stops trials

    @property
    def exit_code(self) -> int:
        return 128 + int(getattr(signal, self.signal)) if self.signal else 0

    def _watchdog(self) -> None:
        if self._ended.wait(self.GRACE_S):
            return
        code = self.exit_code
        try:
            print(f"the search did not stop within {self.GRACE_S:.0f} s (Ray's own processes got the signal "
                  "too?): closing it as interrupted", file=sys.stderr, flush=True)
            self.abandon(self.signal)  # type: ignore[misc]
        finally:
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(code)

    def __exit__(self, *exc: Any) -> None:
        self._ended.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
