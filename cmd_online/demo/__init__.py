"""The ``cmd-online demo``: train a small CNN on real, bundled data with a CMDRecorder attached.

Data come from packages, never from the network: scikit-learn's ``load_digits`` (1,797 8×8 digits)
or MNIST-1D generated locally by ``mnist1d.data.make_dataset`` (its ``get_dataset`` downloads, so
it is never called). Training augments with random shifts, records one CMD point per epoch, and
compares the trained network with the CMD model on the test set.

    data.py    the digits and MNIST-1D tensors, seeded splits, the random-shift augmentation
    model.py   the small CNNs
    loop.py    DemoConfig, the training epoch, the test accuracy, run()
    report.py  DemoResult, the printed rows and table, the progress bar, metrics.json
"""

from .data import DATASETS, load_data, random_shift
from .loop import DemoConfig, accuracy, run, train_epoch
from .model import build_model, model_bytes
from .report import DemoResult, Progress, summary_table

__all__ = ["DATASETS", "DemoConfig", "DemoResult", "Progress", "accuracy", "build_model", "load_data",
           "model_bytes", "random_shift", "run", "summary_table", "train_epoch"]
