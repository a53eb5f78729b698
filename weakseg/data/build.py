"""From a `DataConfig` to data sets and loaders, including the resumable training sampler.

Training is counted in iterations (the paper trains 40000), so the training
stream is an endless sequence of batches. Batch `t` is fully determined by
(seed, t): its indices come from the permutation of epoch `t // steps_per_epoch`
and each sample's augmentation draws from its own seeded RNG. Resuming at
iteration `t` therefore replays exactly the batches an uninterrupted run would
have seen, whatever the number of DataLoader workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from weakseg.config import Config, DataConfig
from weakseg.errors import UserError

DEFAULT_SYNTHETIC_ROOT = Path("~/.cache/weakseg/synthetic")


def voc_root(d: DataConfig) -> Path:
    """The VOC-layout root: configured, or the default synthetic location."""
    if d.root is not None:
        return Path(d.root)
    if d.dataset == "synthetic":
        return DEFAULT_SYNTHETIC_ROOT.expanduser()
    raise UserError("data.root is not set: pass --set data.root=/path/to/VOCdevkit (the folder holding VOC2012)")


def synthetic_difficulty(d: DataConfig):
    """The generator's `Difficulty` for a DataConfig: its preset, with the knobs that are set replacing its values."""
    import dataclasses

    from weakseg.data.synthetic import PRESETS

    base = PRESETS[d.synthetic_preset]
    area = (d.synthetic_object_area_min if d.synthetic_object_area_min is not None else base.object_area[0],
            d.synthetic_object_area_max if d.synthetic_object_area_max is not None else base.object_area[1])
    objects = base.objects
    if d.synthetic_objects_min is not None or d.synthetic_objects_max is not None:
        lo = d.synthetic_objects_min if d.synthetic_objects_min is not None else (objects[0] or 1)
        objects = (lo, d.synthetic_objects_max if d.synthetic_objects_max is not None else max(lo, objects[1]))
    knobs = {"distinct": d.synthetic_distinct, "clutter": d.synthetic_clutter,
             "clutter_textured": d.synthetic_clutter_textured, "texture_similarity": d.synthetic_texture_similarity}
    return dataclasses.replace(base, object_area=area, objects=objects,
                               **{k: v for k, v in knobs.items() if v is not None})


def _check_synthetic_root(root: Path, d: DataConfig) -> None:
    """A root that is not our generated set is the user's data: say which dataset key reads it."""
    import json

    from weakseg.data.synthetic import MANIFEST

    manifest = root / MANIFEST
    if not manifest.is_file():
        if root.is_dir() and any(root.iterdir()):
            raise UserError(
                f"data.root {root} holds data that weakseg did not generate, but data.dataset=synthetic (the demo "
                "config's default) reads or generates a synthetic set there: pass --set data.dataset=voc to train "
                "on your own VOC-layout data (data.root: the folder holding VOCdevkit, VOCdevkit or VOC2012)")
        return
    try:
        recorded = json.loads(manifest.read_text()).get("difficulty")
    except (OSError, ValueError):
        raise UserError(f"{manifest}: unreadable; delete {root} to regenerate the synthetic set") from None
    wanted = synthetic_difficulty(d).to_dict()
    if recorded is not None and recorded != wanted:
        diff = ", ".join(f"{k}: {recorded.get(k)} (wanted {v})" for k, v in wanted.items() if recorded.get(k) != v)
        raise UserError(f"data.root {root} holds a synthetic set of another difficulty ({diff}): "
                        "use another data.root for these data.synthetic_* settings")


def ensure_synthetic(d: DataConfig) -> Path:
    """Generate the synthetic data set under data.root on first use (dataset=synthetic only)."""
    root = voc_root(d)
    if d.dataset == "synthetic" and (root / "VOCdevkit" / "VOC2012").is_dir():
        _check_synthetic_root(root, d)
    if d.dataset == "synthetic" and not (root / "VOCdevkit" / "VOC2012").is_dir():
        from weakseg.data.synthetic import make_synthetic

        _check_synthetic_root(root, d)
        print(f"weakseg: generating the synthetic data set in {root}", flush=True)
        try:
            make_synthetic(
                root,
                n_train=d.synthetic_train,
                n_val=d.synthetic_val,
                n_test=d.synthetic_test,
                size=d.synthetic_size,
                seed=d.synthetic_seed,
                difficulty=synthetic_difficulty(d),
            )
        except (FileExistsError, UserError):
            if not (root / "VOCdevkit" / "VOC2012").is_dir():
                raise
            # another process generated the same set at the same moment and renamed it in first
    return root


def train_dataset(cfg: Config) -> Dataset:
    """The training set; weak supervision never opens a mask."""
    from weakseg.data.transforms import train_transform

    d = cfg.data
    full = cfg.supervision in ("full", "pseudo")  # pseudo: masks from data.pseudo_root
    tf = train_transform(
        crop_size=d.crop_size,
        scale=(d.scale_min, d.scale_max),
        mode=d.train_mode,
        flip=d.flip,
    )
    if d.dataset == "imagenet":
        if full:
            raise UserError("supervision=full needs pixel masks: the ImageNet subset has none (use data.dataset=voc)")
        if d.train_root is None:
            raise UserError("data.train_root is not set: pass --set data.train_root=/path/to/imagenet_subset")
        from weakseg.data.imagenet import ImageNetSubset

        mapping = Path(d.synset_mapping) if d.synset_mapping else None
        return ImageNetSubset(Path(d.train_root), transform=tf, mapping=mapping, max_pixels=d.max_pixels)
    from weakseg.data.voc import VOCSegmentation

    root = ensure_synthetic(d)
    return VOCSegmentation(
        root,
        d.train_split,
        with_masks=full,
        transform=tf,
        labels_file=Path(d.labels_file) if d.labels_file else None,
        sbd_root=Path(d.sbd_root) if d.sbd_root else None,
        max_pixels=d.max_pixels,
        mask_root=Path(d.pseudo_root) if cfg.supervision == "pseudo" else None,
    )


def eval_dataset(cfg: Config, split: str | None = None, root: Path | None = None, with_masks: bool = True) -> Dataset:
    from weakseg.data.transforms import eval_transform
    from weakseg.data.voc import VOCSegmentation

    d = cfg.data
    root = root if root is not None else ensure_synthetic(d)
    ds = VOCSegmentation(root, split or d.val_split, with_masks=with_masks, transform=eval_transform(),
                         max_pixels=d.max_pixels)
    return ds


class Subset(Dataset):
    def __init__(self, base: Dataset, n: int):
        self.base, self.n = base, min(n, len(base))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return self.base[i]


def limit(ds: Dataset, n: int) -> Dataset:
    """The first n items (n = 0: all)."""
    return Subset(ds, n) if n > 0 and n < len(ds) else ds  # type: ignore[arg-type]


# ------------------------------------------------------------------ resumable stream


def _mix(*xs: int) -> int:
    """A fixed 63-bit hash of integers (splitmix64 steps), for per-sample seeds."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class IterationBatchSampler(Sampler):
    """Yields batches [(index, sample_seed), ...] for iterations start, start+1, ..., stop-1."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int):
        if n < 1:
            raise UserError("the training set is empty")
        self.n, self.batch_size, self.seed, self.start, self.stop = n, batch_size, seed, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm_epoch, perm = -1, None
        for t in range(self.start, self.stop):
            batch = []
            for k in range(self.batch_size):
                pos = t * self.batch_size + k  # position in the endless stream
                epoch, off = divmod(pos, self.n)
                if epoch != perm_epoch:
                    g = torch.Generator().manual_seed(_mix(self.seed, epoch))
                    perm, perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
                batch.append((perm[off], _mix(self.seed, t, k, 1)))
            yield batch


class SeededItems(Dataset):
    """Loads item `index` with torch's RNG seeded by `sample_seed`, so augmentation is replayable."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.base[index]


@dataclass(frozen=True)
class LoaderOptions:
    workers: int
    pin_memory: bool
    persistent: bool = True  # evaluation loader: keep its workers alive between evaluations


def train_loader(ds: Dataset, cfg: Config, start: int, stop: int, opts: LoaderOptions) -> DataLoader:
    sampler = IterationBatchSampler(len(ds), cfg.optim.batch_size, cfg.train.seed, start, stop)  # type: ignore[arg-type]
    return DataLoader(
        SeededItems(ds),
        batch_sampler=sampler,
        num_workers=opts.workers,
        pin_memory=opts.pin_memory,
        persistent_workers=False,  # one iterator serves the whole run: nothing to persist across
        prefetch_factor=4 if opts.workers > 0 else None,
    )


def eval_loader(ds: Dataset, opts: LoaderOptions) -> DataLoader:
    """One image per batch: evaluation runs at each image's own size."""
    # persistent: the same loader serves every evaluation of a run, so its workers are started once
    return DataLoader(ds, batch_size=1, shuffle=False, num_workers=opts.workers, pin_memory=opts.pin_memory,
                      persistent_workers=opts.persistent and opts.workers > 0)
