"""The Hugging Face Trainer under ``torchrun --nproc_per_node 2`` (DDP, gloo on CPU) with a CMDCallback.

    torchrun --nproc_per_node 2 tests/_hf_ddp.py OUT

Every rank writes what tests/test_transformers.py checks to OUT. Examples are taken in order
(``train_sampling_strategy="sequential"``): rank r gets batches r, r + 2, …, so each global step sees
the examples of one batch of 2 × BATCH in a single process.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _hf_setup import Chars, arguments, make_model  # noqa: E402

from cmd_online.integrations.transformers import CMDCallback  # noqa: E402

STEPS, BATCH, EXAMPLES = 24, 8, 512
# Adam's first steps move most weights alike, so the warm-up clustering can hinge on round-off: this
# configuration's references stayed the same under 1e-6 relative perturbations of the initial weights
CONFIG = dict(modes=3, samples=200, warmup=4, seed=0, record_every_n_steps=3)


def main(out: Path) -> None:
    from transformers import Trainer

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rank = int(os.environ["RANK"])
    callback = CMDCallback(**CONFIG, export_dir=f"cmd_model_rank{rank}")
    trainer = Trainer(model=make_model(), train_dataset=Chars(EXAMPLES), callbacks=[callback],
                      args=arguments(out / "run", per_device_train_batch_size=BATCH, max_steps=STEPS,
                                     train_sampling_strategy="sequential", save_strategy="steps", save_steps=8,
                                     ddp_find_unused_parameters=False))
    trainer.train()
    rec = callback.recorder
    traj = rec.trajectory()
    result = {"rank": rank, "world_size": trainer.args.world_size, "global_step": trainer.state.global_step,
              "num_records": rec.num_records, "a": traj.a, "b": traj.b, "modes": traj.modes,
              "references": traj.references, "reference_index": traj.reference_index, "state": rec.state_dict(),
              "cmd": callback.cmd_state_dict()}
    try:  # a sharded Trainer is refused by the callback, naming the strategy
        Trainer(model=make_model(), train_dataset=Chars(EXAMPLES), callbacks=[CMDCallback()],
                args=arguments(out / "fsdp", fsdp=True))
        result["fsdp"] = "accepted"
    except Exception as e:  # noqa: BLE001 - the message is the result
        result["fsdp"] = f"{type(e).__name__}: {e}"
    torch.save(result, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
