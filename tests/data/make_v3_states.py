"""Made tests/data/v3_states.pt: CMDRecorder states of version 3 (cmd_online before issue 23), for
tests/test_lean.py's old-state loading. Run once with that version's code (it was, at commit 5cbf945):

    PYTHONPATH=. python tests/data/make_v3_states.py

A small MLP (64-16-10) trains on the digits with SGD; each case records 8 warm-up and some window
records and keeps its ``state_dict()`` with the CMD weights the recorder gave then
(``cmd_state_dict()``). Loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pathlib

import torch

from cmd_online import CMDRecorder
from cmd_online.demo import data

# name: (freeze_modes_after, window records, parameter dtype)
CASES = {
    "full": (None, 6, torch.float32),          # the full form
    "compact": (3, 6, torch.float32),          # frozen after 3 window records
    "before_freeze": (3, 2, torch.float32),    # freeze_modes_after=3, 2 window records: still the full form
    "compact_float64": (3, 5, torch.float64),  # float64 parameters: a float64 shift
    "warmup": (None, 0, torch.float32),        # 5 of the 8 warm-up records
}


def case(freeze, window, dtype):
    torch.manual_seed(0)
    x, y = data.digits()
    x, y = x.reshape(len(y), -1).to(dtype), y
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10)).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    rec = CMDRecorder(opt, model, modes=3, samples=200, warmup=8, freeze_modes_after=freeze)
    records = 5 if window == 0 else 8 + window - 1  # the warm-up's last record is the window's first
    g = torch.Generator().manual_seed(0)
    for _ in range(records):
        for _ in range(3):
            i = torch.randint(len(y), (64,), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
        rec.record()
    out = {"state": rec.state_dict(), "weights": {k: v.clone() for k, v in model.state_dict().items()}}
    if window:
        out["cmd"] = {k: v.clone() for k, v in rec.cmd_state_dict().items()}
    return out


def main() -> None:
    states = {name: case(*spec) for name, spec in CASES.items()}
    path = pathlib.Path(__file__).with_name("v3_states.pt")
    torch.save(states, path)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
