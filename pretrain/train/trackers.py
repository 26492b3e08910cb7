"""Where the run's numbers go besides metrics.jsonl and layer_stats.jsonl: the experiment trackers of
logging.backends, on rank 0 only, each one class behind the `Tracker` protocol. MetricsWriter
(pretrain/train/metrics.py) feeds them the train and validation records, the per-layer diagnostics writer
(pretrain/diagnostics/writer.py) the layer statistics; nothing else knows which backends a run has.

    tensorboard   run.dir/tb/        event files; a resumed run purges the steps after its checkpoint
    wandb         run.dir/wandb/     W&B, offline unless WANDB_MODE says otherwise (upload: `wandb sync
                                     run.dir/wandb/offline-run-*`)
    trackio       run.dir/trackio/   trackio's local database (TRACKIO_DIR; `TRACKIO_DIR=run.dir/trackio trackio show`)

Every finite number of a record is logged as `<prefix>/<key>` at the record's step: train/loss, val/val_loss,
layers/variance/l01, layers/grad_norm_head. The resolved config is the W&B and trackio run's config. Their run ids
are kept in run.dir/tracking.json (pretrain/runs.py), so a resumed or requeued run logs to the same W&B run
(`wandb.init(id=..., resume="allow")`) and the same trackio run (its name, `resume="allow"`). wandb and trackio are
imported here when a run opens them, never by `pretrain --help` or by a run that does not log to them;
`LoggingConfig.check_installed` (pretrain/config/sections.py) refuses a missing one before any process starts.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import secrets
import string
from typing import Protocol

from pretrain import compat
from pretrain.config import ExperimentConfig, to_dict
from pretrain.errors import UserError
from pretrain.runs import read_tracking, write_tracking

TENSORBOARD_DIR, WANDB_DIR, TRACKIO_DIR = "tb", "wandb", "trackio"  # inside run.dir (W&B adds the wandb/ itself)


class Tracker(Protocol):
    """One experiment tracker of a run: `log` a record's numbers at `step` under `prefix`/, `close` at the end."""

    name: str  # its logging.backends entry
    line: str  # where it logs and how to look, said when the run starts
    ids: dict | None  # what tracking.json keeps of it to continue the same tracker run (None: nothing)

    def log(self, record: dict, prefix: str, step: int) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict, prefix: str) -> dict[str, float]:
    """{`prefix/key`: value} of the record's finite numbers (its step, texts, lists and nulls left out)."""
    return {f"{prefix}/{k}": v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}


class TensorBoardTracker:
    name, ids = "tensorboard", None

    def __init__(self, run_dir: str, start_step: int):
        from torch.utils.tensorboard import SummaryWriter  # torch's; a run that logs nowhere does not load it

        folder = os.path.join(run_dir, TENSORBOARD_DIR)
        self.writer = SummaryWriter(folder, purge_step=start_step + 1)  # the events after the checkpoint go
        self.line = f"TensorBoard: tensorboard --logdir {folder}"

    def log(self, record: dict, prefix: str, step: int) -> None:
        values = scalars(record, prefix)
        if values:
            compat.add_scalars(self.writer, list(values.items()), step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbTracker:
    name = "wandb"

    def __init__(self, cfg: ExperimentConfig, config: dict, previous: dict):
        wandb = _import("wandb")
        run_dir = cfg.run.dir
        same = previous.get("project") == cfg.logging.project and previous.get("id")
        run_id = previous["id"] if same else new_run_id()
        name = previous.get("name") if same else run_name(run_dir)
        mode = os.environ.get("WANDB_MODE") or "offline"  # clusters without network: sync later
        self.run = wandb.init(
            project=cfg.logging.project, id=run_id, name=name, resume="allow", dir=run_dir, config=config, mode=mode,
            settings=wandb.Settings(console="off", silent=True),  # the log lines stay ours, stdout unwrapped
        )
        self.ids = {"project": cfg.logging.project, "id": run_id, "name": name}
        files = os.path.dirname(self.run.dir)  # run.dir/wandb/offline-run-DATE-ID (one per process of the run)
        if self.run.offline:
            self.line = (f"W&B: offline run {run_id} in {files}; upload with `wandb sync "
                         f"{os.path.join(run_dir, WANDB_DIR, 'offline-run-*')}`")
        else:
            self.line = f"W&B: run {run_id} ({mode}), local files in {files}"

    def log(self, record: dict, prefix: str, step: int) -> None:
        values = scalars(record, prefix)
        if values:
            self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    name = "trackio"

    def __init__(self, cfg: ExperimentConfig, config: dict, previous: dict):
        folder = os.path.join(cfg.run.dir, TRACKIO_DIR)
        compat.set_trackio_dir(folder)  # trackio reads its folder when imported: set before the import
        trackio = _import("trackio")
        same = previous.get("project") == cfg.logging.project and previous.get("name")
        name = previous["name"] if same else run_name(cfg.run.dir)
        self.trackio = trackio
        with _quiet():  # trackio prints its own banner and dashboard instructions
            self.run = trackio.init(project=cfg.logging.project, name=name, config=config, resume="allow",
                                    embed=False)
        self.ids = {"project": cfg.logging.project, "name": name, "id": self.run.id}
        self.line = (f"trackio: run {name} of project {cfg.logging.project} in {folder}; look with "
                     f"`TRACKIO_DIR={folder} trackio show --project {cfg.logging.project}`")

    def log(self, record: dict, prefix: str, step: int) -> None:
        values = scalars(record, prefix)
        if values:
            self.run.log(values, step=step)

    def close(self) -> None:
        with _quiet():
            self.trackio.finish()  # the current run (this one), flushed; at exit trackio has nothing left to finish


def open_trackers(cfg: ExperimentConfig, start_step: int) -> list[Tracker]:
    """The trackers of logging.backends for a run whose folder exists (rank 0; the run resumes after `start_step`),
    the W&B/trackio run ids from tracking.json and written back there (atomically) when new."""
    ids = read_tracking(cfg.run.dir)
    config = to_dict(cfg)
    trackers: list[Tracker] = []
    try:
        for name in cfg.logging.backends:
            trackers.append(OPENERS[name](cfg, start_step, config, ids.get(name) or {}))
    except BaseException:
        close_all(trackers)
        raise
    kept = {t.name: t.ids for t in trackers if t.ids is not None}
    if any(ids.get(name) != value for name, value in kept.items()):
        write_tracking(cfg.run.dir, {**ids, **kept})
    return trackers


# logging.backends entry -> (cfg, start step, resolved config, its tracking.json entry) -> Tracker
OPENERS = {
    "tensorboard": lambda cfg, start_step, config, previous: TensorBoardTracker(cfg.run.dir, start_step),
    "wandb": lambda cfg, start_step, config, previous: WandbTracker(cfg, config, previous),
    "trackio": lambda cfg, start_step, config, previous: TrackioTracker(cfg, config, previous),
}


def close_all(trackers: list[Tracker]) -> list[str]:
    """Close every tracker, each even when another fails; returns a line per failure (the run's files and
    checkpoint are written by then: a tracker that cannot finish does not fail the run)."""
    failed = []
    for tracker in trackers:
        try:
            tracker.close()
        except Exception as e:  # noqa: BLE001 - any tracker's own error, said and passed over
            failed.append(f"warning: closing {tracker.name} failed: {type(e).__name__}: {e}")
    return failed


def new_run_id() -> str:
    """A W&B run id: 8 characters of [a-z0-9], as W&B makes its own."""
    chars = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(chars) for _ in range(8))


def run_name(run_dir: str) -> str:
    """The tracker run's display name: the run folder's name (a sweep's runs: norm_scheme=lns, ...)."""
    return os.path.basename(os.path.normpath(os.path.abspath(run_dir)))


def _import(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise UserError(f"logging.backends: {module} cannot be imported ({e}); install the tracking extra "
                        f"(pip install -e '.[tracking]' in a checkout) or drop {module} from logging.backends") from None


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()):
        yield
