"""Lightning ``strategy="ddp"`` on 2 CPU processes (gloo) with a CMDCallback: ``python tests/_lightning_ddp.py OUT``.

Run as a script because Lightning's DDP launcher starts the other rank by running this script again
(it cannot re-run pytest). Every rank writes what tests/test_lightning.py checks to OUT.
Lightning replaces the sampler by a DistributedSampler that shuffles training data with a permutation
seeded by the epoch (as tests/_lightning_setup.EpochShuffle does), each rank taking every other example.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _lightning_setup import Digits, train_loader, trainer  # noqa: E402

from cmd_online.integrations.lightning import CMDCallback  # noqa: E402

EPOCHS, BATCH = 4, 32  # per rank: 2 × 32 is the single process's batch of 64
CONFIG = dict(modes=3, samples=200, warmup=4, seed=0, record_every_n_steps=4)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rank = int(os.environ.get("LOCAL_RANK", 0))  # set by Lightning's launcher in the started process
    callback = CMDCallback(**CONFIG, export_path=out / f"export_rank{rank}.ckpt")
    fit = trainer(strategy="ddp", devices=2, max_epochs=EPOCHS, callbacks=[callback], enable_checkpointing=True,
                  default_root_dir=out)
    model = Digits()
    fit.fit(model, train_loader(BATCH, shuffle=False))  # Lightning puts its DistributedSampler in
    rec = callback.recorder
    traj = rec.trajectory()
    torch.save({"rank": fit.global_rank, "world_size": fit.world_size, "global_step": fit.global_step,
                "num_records": rec.num_records, "a": traj.a, "b": traj.b, "modes": traj.modes,
                "references": traj.references, "reference_index": traj.reference_index,
                "state": rec.state_dict(), "cmd": callback.cmd_state_dict()},
               out / f"rank{fit.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
