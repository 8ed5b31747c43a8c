"""TensorBoard's HParams summary of every done run, in RUN_DIR/tb beside the engine's scalars (on by default;
`tracking: {tensorboard: false}` turns it off, as does the recipe's `tensorboard: false`, which turns off
the run's TensorBoard scalars), so `tensorboard --logdir OUT/runs` compares the runs of a
study in its HParams tab out of the box: the run's parameters (`spach.battle.tracking.run_params`) and its
final figures (top-1, losses, params, MACs, images/s) as the metrics.

Written once per run, at the end of the study (after the quiet measure phase, so the throughput is in it),
into an events file ending in `.hparams`; a run that has one is not written again.
"""
from __future__ import annotations

import json
from pathlib import Path

from spach.battle.tracking import Tracker, final_metrics, run_params

SUFFIX = ".hparams"


class HParamsTracker(Tracker):
    """Writes the HParams summary of each done run that has none yet."""

    name = "tensorboard"

    def study_finished(self, rows: list[dict], report: Path | None) -> None:
        for row in rows:
            folder = Path(row["output_dir"]) / "tb"
            wanted = row["status"] == "done" and json.loads(row["config"])["train"].get("tensorboard", True)
            if wanted and Path(row["output_dir"]).is_dir() and not list(folder.glob(f"*{SUFFIX}")):
                write_hparams(folder, run_params(row), final_metrics(row))


def write_hparams(folder: Path, params: dict, metrics: dict[str, float]) -> None:
    """One events file in `folder`: the HParams experiment, session start and end, and each metric as a
    scalar under `hparams/NAME` (what the HParams tab shows for the session)."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    tagged = {f"hparams/{k}": v for k, v in metrics.items()}
    experiment, start, end = hparams(params, tagged)
    writer = SummaryWriter(log_dir=str(folder), filename_suffix=SUFFIX)
    try:
        for summary in (experiment, start, end):
            writer.file_writer.add_summary(summary)
        for tag, value in tagged.items():
            writer.add_scalar(tag, value)
    finally:
        writer.close()
