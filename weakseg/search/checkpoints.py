"""Where a search's checkpoints live, and how to get one onto this machine.

A trial's checkpoints are Ray Tune checkpoint folders holding `checkpoint.pt`,
under the search's storage path: a local or shared folder, or s3:// / gs://.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from weakseg.errors import UserError
from weakseg.search.trial import CHECKPOINT_FILE


def resolve_checkpoint(location: str, cache: Path | None = None) -> Path:
    """A local path to the `checkpoint.pt` behind a checkpoint file, folder or remote URI."""
    if "://" in location and not location.startswith("file://"):
        from ray import tune

        target = Path(cache or tempfile.mkdtemp(prefix="weakseg-ckpt-"))
        try:
            tune.Checkpoint(location).to_directory(str(target))
        except Exception as e:  # pyarrow/fsspec errors vary by scheme (no credentials, no such object...)
            raise UserError(f"checkpoint {location}: cannot download it ({str(e).splitlines()[0]})") from None
        path = target / CHECKPOINT_FILE
    else:
        path = Path(location.removeprefix("file://")).expanduser()
        if path.is_dir():
            path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise UserError(f"checkpoint {location}: no {CHECKPOINT_FILE} there")
    return path


def best_of_search(location: Path, allow_incomplete: bool = False) -> str:
    """The chosen trial's last checkpoint of a finished search: from results/<name>/ (search.json) or its space file.

    A running search's best checkpoint may be rotated away by Ray at any moment, and an interrupted
    search's best is not final: both are refused unless `allow_incomplete`."""
    location = Path(location)
    if location.is_file() and location.suffix in (".yaml", ".yml"):
        from weakseg.search.space import load_space

        location = load_space(location).results_dir
    summary = location / "search.json"
    if not summary.is_file():
        raise UserError(f"--best {location}: no search.json there (is it a finished search's results folder?)")
    try:
        data = json.loads(summary.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"--best: {summary} is not valid JSON ({e.msg}, line {e.lineno})") from None
    status = data.get("status", "finished")  # search.json files older than the status field: finished
    if status != "finished" and not (allow_incomplete and status in ("running", "interrupted")):
        why = {"running": "is still running (or its driver died): its best checkpoint may change or be deleted",
               "interrupted": f"was interrupted ({data.get('interrupted_by') or 'a signal'}) and is incomplete",
               "failed": "has no successful trial"}.get(status, f"has status {status!r}")
        hint = "; --resume it first, or pass --allow-incomplete" if status in ("running", "interrupted") else ""
        raise UserError(f"--best: search {data.get('name', location)} {why}{hint}")
    best = data.get("best_checkpoint")
    if not best:
        raise UserError(f"--best: search {data.get('name', location)} has no successful trial")
    return str(best)
