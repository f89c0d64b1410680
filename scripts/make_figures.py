"""The figures of docs/figures.md, from a short real run: a small CNN on scikit-learn's digits.

    python scripts/make_figures.py [--epochs 30] [--warmup 8] [--modes 5] [--samples 500] [--out docs/img]

Trains with random-shift augmentation (the data, network and training epoch of ``cmd_online.demo``,
with this script's split and widths) and a CMDRecorder recording once per epoch on the CPU, then writes
three PNGs with matplotlib:

    fig-references.png   the reference weight of every mode over the run (the paper's Fig. 25)
    fig-correlation.png  |corr| of the sampled weights at the end of the warm-up, ordered by mode,
                         with the mode boundaries (the paper's Fig. 2)
    fig-accuracy.png     test accuracy per epoch: trained network, CMD model of the whole run, and the
                         CMD model as known online at each epoch

and prints the numbers docs/figures.md quotes.
"""

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.cluster.hierarchy import leaves_list, linkage  # noqa: E402
from scipy.spatial.distance import squareform  # noqa: E402

import cmd_online as cmdo  # noqa: E402
from cmd_online import demo  # noqa: E402

COLORS = plt.get_cmap("tab10").colors


def train(args):
    """Train, record per epoch; returns the recorder, the model and per-epoch accuracies."""
    torch.manual_seed(args.seed)
    x, y = demo.data.digits()
    (x_train, y_train), (x_test, y_test) = demo.data.split(x, y, (int(0.75 * len(y)), None), args.seed)
    model = demo.model.digits_cnn(channels=(8,), hidden=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    recorder = cmdo.CMDRecorder(optimizer, model, modes=args.modes, samples=args.samples, warmup=args.warmup,
                                seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    trained, online = [], []

    def test() -> float:
        return 100 * demo.accuracy(model, x_test, y_test)

    for _ in range(args.epochs):
        demo.train_epoch(model, optimizer, x_train, y_train, generator,
                         augment=lambda xb, g: demo.random_shift(xb, 1, g, draw="joint"))
        recorder.record()
        trained.append(test())
        if recorder.phase == "tracking":  # the CMD model as a user could query it at this epoch
            with recorder.swapped():
                online.append(test())
        else:
            online.append(float("nan"))
    whole_run = []  # the final CMD model (a, b fitted on the whole window), at each epoch of the window
    for at in range(recorder.num_records):
        if at < recorder.window_start:
            whole_run.append(float("nan"))
            continue
        with recorder.swapped(at=at):
            whole_run.append(test())
    return recorder, model, np.array(trained), np.array(online), np.array(whole_run)


def shade_warmup(ax, recorder):
    ax.axvspan(-0.5, recorder.window_start, color="0.9", zorder=0)
    ax.axvline(recorder.window_start, color="0.5", lw=0.8, ls="--", zorder=1)


def plot_references(recorder, trajectory, path):
    M = trajectory.num_modes
    sizes = trajectory.mode_sizes().tolist()
    r2 = trajectory.mode_r2.tolist()
    refs = trajectory.references.numpy()
    fig, axes = plt.subplots(M, 1, figsize=(7, 1.25 * M + 0.9), sharex=True, squeeze=False)
    epochs = np.arange(trajectory.num_records)
    for m, ax in enumerate(axes[:, 0]):
        shade_warmup(ax, recorder)
        ax.plot(epochs, refs[m], color=COLORS[m % 10], lw=1.6, marker=".", ms=3)
        ax.set_ylabel("value", fontsize=8)
        ax.tick_params(labelsize=8)
        name = recorder.layout.names[int(recorder.layout.locate(trajectory.reference_index[m:m + 1])[0])]
        ax.set_title(f"mode {m}: {sizes[m]:,} weights ({100 * sizes[m] / trajectory.num_weights:.0f} %), "
                     f"mean R² {r2[m]:.2f}; reference in {name}", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("epoch (record)")
    fig.suptitle("Reference weights r_m(t): every weight of mode m moves as a·r_m(t) + b\n"
                 "(grey: warm-up, records 0..F−1; dashed: fit window starts at F−1)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_correlation(clustering, path):
    labels = clustering.labels[clustering.varying]
    # inside each mode, the dendrogram's leaf order puts similar samples next to each other
    distance = 1.0 - clustering.abs_corr
    np.fill_diagonal(distance, 0.0)
    leaves = leaves_list(linkage(squareform(distance, checks=False), method="complete"))
    order = leaves[np.argsort(labels[leaves], kind="stable")]
    C = clustering.abs_corr[np.ix_(order, order)]
    sorted_labels = labels[order]
    bounds = np.flatnonzero(np.diff(sorted_labels)) + 1
    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    image = ax.imshow(C, cmap="viridis", vmin=0, vmax=1, interpolation="antialiased")  # 500 px into ~450: smooth, small file
    for b in bounds:
        ax.axhline(b - 0.5, color="white", lw=1.2)
        ax.axvline(b - 0.5, color="white", lw=1.2)
    edges = np.concatenate([[0], bounds, [len(labels)]])
    centres = (edges[:-1] + edges[1:]) / 2 - 0.5
    ax.set_xticks(centres, [str(m) for m in sorted_labels[edges[:-1]]])
    ax.set_yticks(centres, [str(m) for m in sorted_labels[edges[:-1]]])
    ax.set_xlabel("sampled weights, grouped by mode")
    ax.set_ylabel("mode")
    ax.set_title(f"|corr| of the {len(labels)} sampled weights over the warm-up,\n"
                 f"clustered into {clustering.num_modes} modes (complete linkage on 1 − |corr|)", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="|corr|")
    fig.tight_layout()
    fig.savefig(path, dpi=100)  # the noisy matrix compresses badly: keep the file small
    plt.close(fig)


def plot_accuracy(recorder, trained, online, whole_run, path):
    epochs = np.arange(len(trained))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    shade_warmup(ax, recorder)
    ax.plot(epochs, trained, color="0.2", lw=1.6, label="trained network")
    ax.plot(epochs, whole_run, color=COLORS[0], lw=1.8, label="CMD model of the whole run, at each epoch")
    ax.plot(epochs, online, color=COLORS[1], lw=1.2, ls=":", marker=".", ms=4,
            label="CMD model as known online at each epoch")
    low = np.nanmin(np.concatenate([trained[recorder.window_start:], whole_run[recorder.window_start:]]))
    ax.set_ylim(max(0, low - 5), 100)
    ax.set_xlabel("epoch (record)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Digits, small CNN with shift augmentation (grey: warm-up, no CMD model yet)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--modes", type=int, default=5)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/img")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    start = time.perf_counter()
    recorder, model, trained, online, whole_run = train(args)
    trajectory = recorder.trajectory()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_references(recorder, trajectory, out / "fig-references.png")
    plot_correlation(recorder.clustering, out / "fig-correlation.png")
    plot_accuracy(recorder, trained, online, whole_run, out / "fig-accuracy.png")
    last = len(trained) - 1
    print(f"weights N = {trajectory.num_weights}, modes M = {trajectory.num_modes}, "
          f"mode sizes {trajectory.mode_sizes().tolist()}")
    print(f"mean R² per mode {[round(v, 3) for v in trajectory.mode_r2.tolist()]}")
    print(f"test accuracy at epoch {last}: trained {trained[last]:.1f} %, CMD {whole_run[last]:.1f} %")
    print(f"best test accuracy after the warm-up: trained {trained[recorder.window_start:].max():.1f} %, "
          f"CMD {np.nanmax(whole_run):.1f} %")
    print(f"recorder holds {recorder.nbytes()['total']:,} bytes; one float32 model copy is "
          f"{4 * trajectory.num_weights:,} bytes")
    print(f"wrote {', '.join(str(out / n) for n in ('fig-references.png', 'fig-correlation.png', 'fig-accuracy.png'))} "
          f"in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
