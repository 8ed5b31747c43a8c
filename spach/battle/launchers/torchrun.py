"""The torchrun launcher (`launcher: {kind: torchrun, nproc_per_node: N, args: [...]}`): each run one
`torchrun --standalone --nproc_per_node N -m spach.battle.worker OUT KEY` on this machine (DDP).

Only rank 0 writes the database; `--workers W` runs W launches at a time, each on its own N GPUs.
The torch threads are left to torchrun (it sets OMP_NUM_THREADS=1 per process when N > 1).
"""
from __future__ import annotations

import sys

from spach.battle.launchers.processes import SlotLauncher


class TorchrunLauncher(SlotLauncher):
    """One torchrun launch per run, followed through the database."""

    kind = "torchrun"
    serving = False

    def __init__(self, study, out_dir, workers: int = 1, threads: int | None = None):
        super().__init__(study, out_dir, workers=workers, threads=None)  # threads: torchrun's (see above)
        self.per_run_threads = threads

    def describe(self) -> str:
        return f"{self.workers} worker(s) x {self.per_run_threads} thread(s)"

    def command_prefix(self) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={self.settings['nproc_per_node']}", *self.settings.get("args", [])]

    def gpus_per_slot(self) -> int:
        return self.settings["nproc_per_node"]
