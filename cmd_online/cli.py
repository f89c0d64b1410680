"""The ``cmd-online`` command: a demo on real data, and tools for trajectory files.

    cmd-online demo [--data digits|mnist1d] [--epochs E] [--warmup F] [--modes M] [--samples K] ...
    cmd-online inspect TRAJECTORY | LIGHTNING.ckpt | TRAINER_CHECKPOINT_FOLDER [--callback KEY] [--json]
    cmd-online report TRAJECTORY -o DIR
    cmd-online export TRAJECTORY | LIGHTNING.ckpt | TRAINER_CHECKPOINT_FOLDER [--at N] -o OUTPUT
    cmd-online decompose CHECKPOINT... | FOLDER -o TRAJECTORY [--modes M | --threshold t [--max-modes B]] ...

A user mistake (missing file, wrong kind of file, out-of-range option) prints one line,
``cmd-online: error: ...``, to stderr and exits with status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import collections.abc
import math
import os
import sys
import textwrap
from pathlib import Path
from typing import Sequence

PROG = "cmd-online"
USER_ERRORS = (ValueError, TypeError, OSError)  # FileNotFoundError is an OSError


class UsageError(Exception):
    """A mistake in the command line, reported in one line."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a mistake in one line (no usage block), under the command's own name."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _number(expected: str, ok, convert=float):
    """An argparse type: ``convert(text)`` for which ``ok(value)`` holds, else an error saying what was expected."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value
    return parse


def _int_at_least(low: int):
    return _number(f"an integer ≥ {low}", lambda value: value >= low, int)


def _freeze(text: str) -> int | None:
    """--freeze-modes-after: an integer ≥ 1, or 'none' (the full form)."""
    return None if text.strip().lower() == "none" else _int_at_least(1)(text)


_threshold = _number("a number in (0, 1]", lambda value: 0 < value <= 1)
_positive_float = _number("a positive number", lambda value: value > 0 and math.isfinite(value))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Online Correlation Mode Decomposition (CMD) of training "
                     "trajectories: a demo on real data and tools for trajectory files.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_demo, _add_inspect, _add_report, _add_export, _add_decompose):
        add(commands)
    return parser


def _add_demo(commands) -> None:
    """The ``demo`` command."""
    demo = commands.add_parser("demo", help="train a small CNN with a CMDRecorder attached and compare "
                               "the CMD model with the trained one",
                               description="Train a small CNN on bundled real data (no download) with a "
                               "CMDRecorder recording once per epoch; write the CMD model, the trajectory "
                               "and TensorBoard logs to --out; print a table per block of epochs and a "
                               "summary.")
    demo.add_argument("--data", choices=("digits", "mnist1d"), default="digits",
                      help="scikit-learn's load_digits, or MNIST-1D generated locally (default digits)")
    demo.add_argument("--epochs", type=_int_at_least(1), default=60, help="training epochs, one record each "
                      "(default 60)")
    demo.add_argument("--warmup", type=_int_at_least(2), default=10, help="warm-up records before the modes "
                      "are fixed (default 10)")
    demo.add_argument("--modes", type=_int_at_least(1), default=10, help="number of modes (default 10)")
    demo.add_argument("--samples", type=_int_at_least(1), default=1000, help="sampled weights clustered at "
                      "the end of the warm-up (default 1000)")
    demo.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of split, init, shuffling and sampling "
                      "(default 0)")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--batch-size", type=_int_at_least(1), default=64, help="mini-batch size (default 64)")
    demo.add_argument("--lr", type=_positive_float, default=0.05, help="SGD learning rate (default 0.05)")
    demo.add_argument("--report-every", type=_int_at_least(1), default=None,
                      help="epochs per table row (default: about ten rows)")
    demo.add_argument("--freeze-modes-after", type=_freeze, default=3, metavar="K",
                      help="fix each weight's mode K records into tracking: the compact form (default 3); "
                      "'none' keeps the full form")
    demo.add_argument("--save-checkpoints", action="store_true",
                      help="also save every epoch's weights to OUT/checkpoints/ (for 'decompose')")
    demo.add_argument("--threads", type=_int_at_least(1), default=1, help="torch CPU threads (default 1)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(run=_demo)


def _add_inspect(commands) -> None:
    """The ``inspect`` command."""
    inspect = commands.add_parser("inspect", help="modes, sizes, fit quality and per-layer make-up of a "
                                  "trajectory file, or of the CMD state in a training checkpoint",
                                  description="Describe a trajectory file written by CMDRecorder.trajectory()"
                                  ".save(), 'cmd-online demo' or 'cmd-online decompose', or the CMD state a "
                                  "framework callback stored: in a Lightning checkpoint (.ckpt), in a Hugging Face "
                                  "Trainer checkpoint-N folder (cmd_recorder.pt), or a CMDRecorder state file.")
    inspect.add_argument("trajectory", help="trajectory file, Lightning checkpoint, or Trainer checkpoint folder")
    inspect.add_argument("--callback", default=None, metavar="KEY",
                         help="the CMD callback's state to read, when a Lightning checkpoint holds several")
    inspect.add_argument("--json", action="store_true", help="print everything as one JSON object instead of text")
    inspect.set_defaults(run=_inspect)


def _add_report(commands) -> None:
    """The ``report`` command."""
    report = commands.add_parser("report", help="a web page with the figures of a trajectory file (needs "
                                 "matplotlib)",
                                 description="Draw the figures of a trajectory file — reference trajectories, "
                                 "mode sizes and per-layer make-up, fit quality, the clustered correlation of "
                                 "the samples, per-record metrics — into DIR with an index.html that shows and "
                                 "explains them. Needs matplotlib: pip install 'cmd-online[plots]'.")
    report.add_argument("trajectory", help="trajectory file")
    report.add_argument("-o", "--output", required=True, metavar="DIR", help="folder to write (index.html, *.png, "
                        "summary.json)")
    report.add_argument("--title", default=None, help="the page's title (default: from the file name)")
    report.set_defaults(run=_report)


def _add_export(commands) -> None:
    """The ``export`` command."""
    export = commands.add_parser("export", help="write the CMD weights at one record as a normal checkpoint",
                                 description="Write the CMD weights at record --at. From a trajectory or a "
                                 "recorder state, and whenever OUTPUT ends in .pt or .pth: a state_dict file, "
                                 "model.load_state_dict(torch.load(path)). Otherwise, from a Lightning checkpoint: "
                                 "a Lightning checkpoint of the CMD model (LitModel.load_from_checkpoint); from a "
                                 "Trainer checkpoint-N folder: a model folder as the Trainer saves models, with "
                                 "the CMD weights (from_pretrained).")
    export.add_argument("trajectory", help="trajectory file, Lightning checkpoint, or Trainer checkpoint folder")
    export.add_argument("--at", type=int, default=-1, help="record index; negative counts from the end "
                        "(default -1, the last record)")
    export.add_argument("-o", "--output", required=True, help="checkpoint file (or model folder) to write")
    export.add_argument("--callback", default=None, metavar="KEY",
                        help="the CMD callback's state to read, when a Lightning checkpoint holds several")
    export.set_defaults(run=_export)


def _add_decompose(commands) -> None:
    """The ``decompose`` command."""
    decompose = commands.add_parser("decompose", help="post-hoc CMD from saved per-epoch checkpoints",
                                    description="Post-hoc CMD (paper, Algorithm 2) from checkpoints saved "
                                    "once per record, in order. One folder stands for the run's checkpoints: a "
                                    "Hugging Face Trainer output folder for its checkpoint-N folders (by N), else "
                                    "the checkpoint files in it (.pt, .pth, .ckpt, .bin, .safetensors) in natural "
                                    "order (epoch_2 before epoch_10), leaving out links to files already taken and "
                                    "aliases such as last.ckpt or best.pt beside numbered files; the files used "
                                    "and left out are listed. A file holds a state_dict, or a dict with one under "
                                    "'state_dict' (Lightning) or 'model'; a checkpoint-N folder holds "
                                    "model.safetensors or pytorch_model.bin.")
    decompose.add_argument("checkpoints", nargs="+", help="checkpoint files or checkpoint-N folders, or one folder "
                           "of them")
    decompose.add_argument("-o", "--output", required=True, help="trajectory file to write")
    mode_choice = decompose.add_mutually_exclusive_group()
    mode_choice.add_argument("--modes", type=_int_at_least(1), default=None, help="number of modes "
                             "(default 10 unless --threshold)")
    mode_choice.add_argument("--threshold", type=_threshold, default=None, help="in-mode distance t in (0, 1]: "
                             "every pair in a mode has |corr| ≥ 1 − t")
    decompose.add_argument("--max-modes", type=_int_at_least(1), default=None,
                           help="with --threshold, at most this many modes (a cut that gives more is coarsened)")
    decompose.add_argument("--samples", type=_int_at_least(1), default=1000,
                           help="sampled weights that are clustered (default 1000, at most the weights)")
    decompose.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of the sampling (default 0)")
    decompose.add_argument("--distance", choices=("correlation", "euclidean"), default="correlation",
                           help="clustering distance: 1 − |corr| (default), or the Euclidean distance between "
                           "rows of |corr| as the paper authors' code")
    decompose.add_argument("--warmup", type=_int_at_least(2), default=None,
                           help="cluster on the first F records and fit on [F−1, T), as the online recorder "
                           "with warmup=F does (default: all records, as the paper)")
    decompose.set_defaults(run=_decompose)


# ------------------------------------------------------------------------------------------- commands
def _demo(args) -> None:
    from . import demo

    config = demo.DemoConfig(data=args.data, epochs=args.epochs, warmup=args.warmup, modes=args.modes,
                             samples=args.samples, seed=args.seed, out=args.out, batch_size=args.batch_size,
                             lr=args.lr, report_every=args.report_every or 0,
                             freeze_modes_after=args.freeze_modes_after,
                             save_checkpoints=args.save_checkpoints, progress=not args.no_progress,
                             threads=args.threads)
    config.check()
    result = demo.run(config)
    print()
    print(demo.summary_table(result))
    print()
    print("files:")
    for name, path in result.files.items():
        print(f"  {name:<14}{path}")
    print(f"next: cmd-online inspect {result.files['trajectory']}")
    print(f"      cmd-online report {result.files['trajectory']} -o {Path(args.out) / 'report'}")
    if "tensorboard" in result.files:
        print(f"      tensorboard --logdir {result.files['tensorboard']}")


def _load_trajectory(path: str):
    from .trajectory import CMDTrajectory

    return CMDTrajectory.load(path)


def _sources(path: str, key: str | None = None) -> list[tuple[str, object, str | None]]:
    """(label, trajectory, its file or None) of what ``path`` holds: a trajectory file, or the CMD state(s) a
    framework callback stored (a Lightning checkpoint, a Trainer checkpoint folder, a callback or recorder state
    file)."""
    from . import saved

    folder = Path(path).is_dir()
    if not folder:
        try:
            return [(path, _load_trajectory(path), path)]
        except ValueError as e:
            if "not a cmd_online.CMDTrajectory file" not in str(e):
                raise
            refused = e
    states = saved.cmd_states(path) if not folder or (Path(path) / saved.CALLBACK_FILE).is_file() else {}
    if not states:
        if folder:
            raise ValueError(f"{path!r} is a directory without {saved.CALLBACK_FILE} (a Trainer checkpoint folder "
                             "written with cmd_online's CMDCallback), not a CMD trajectory file")
        raise refused
    if key is not None:
        if key not in states:
            raise ValueError(f"{path!r} holds no CMD state under {key!r}; it holds {', '.join(map(repr, states))}")
        states = {key: states[key]}
    return [(f"{path} [{name}]" if len(states) > 1 or key else path, saved.trajectory_of_state(state), None)
            for name, state in states.items()]


def _inspect(args) -> None:
    from .report import summary, to_json

    sources = _sources(args.trajectory, args.callback)
    found = [(label, summary(traj, path)) for label, traj, path in sources]
    if args.json:
        print(to_json(found[0][1] if len(found) == 1 else {label: data for label, data in found}))
        return
    for i, (label, data) in enumerate(found):
        if i:
            print()
        _describe(label, data)


def _describe(label: str, data: dict) -> None:
    from .units import human_bytes

    N, T, M = data["weights"], data["records"], data["modes"]
    print(f"trajectory   {label}")
    print(f"weights      {N:,} in {data['tensors']} tensors")
    print(f"records      {T} (a, b fitted over records {data['window_start']}..{T - 1})")
    print(f"modes        {M}")
    if data["set_aside"] is not None:
        note = f" ({data['set_aside_note']})" if data["set_aside_note"] else ""
        print(f"set aside    {len(data['set_aside'])} of {M} references{note}")
    if data["samples"] is not None:
        print(f"samples      {data['samples']:,} weights clustered over {data['clustered_records']} records")
    if data["file_bytes"] is not None:  # a trajectory file (not a state inside a training checkpoint)
        print(f"file size    {human_bytes(data['file_bytes'])}; the full history N×T×4 bytes would be "
              f"{human_bytes(data['history_bytes'])} ({data['compression']:.1f}× larger)")
    for name, metric in data["metrics"].items():
        last = "-" if metric["last"] is None else f"{metric['last']:.4g}"
        print(f"metric       {name}: {metric['records']} record(s), last {last}")
    print()
    if data["mean_r2"] is not None:
        print(f"mean R²      {data['mean_r2']:.4f} over all weights (1 = every weight an exact affine copy of its "
              f"reference)")
        print()
    print(f"{'mode':>4}  {'weights':>9}  {'share':>6}  {'mean R²':>7}  reference weight")
    for row in data["mode_table"]:
        fit = "-" if row["mean_r2"] is None else f"{row['mean_r2']:.4f}"
        print(f"{row['mode']:>4}  {row['weights']:>9,}  {100 * row['share']:>5.1f}%  {fit:>7}  {row['reference']}")
    print()
    shown = min(M, 8)
    header = "".join(f"{'m' + str(m):>7}" for m in range(shown)) + ("   rest" if M > shown else "")
    width = max(len("tensor"), *(len(row["name"]) for row in data["tensor_table"]))
    print("weights of each tensor by mode (% of the tensor):")
    print(f"{'tensor':<{width}}  {'size':>9}{header}")
    for row in data["tensor_table"]:
        size, counts = row["size"], row["weights_by_mode"]
        cells = "".join(f"{100 * c / size:>6.1f}%" if size else f"{'-':>7}" for c in counts[:shown])
        if M > shown:
            cells += f"{100 * sum(counts[shown:]) / size:>6.1f}%" if size else f"{'-':>7}"
        print(f"{row['name']:<{width}}  {size:>9,}{cells}")


def _report(args) -> None:
    from .figures import INSTALL_HINT
    from .report import write_report

    try:
        index = write_report(args.trajectory, args.output, title=args.title)
    except ImportError as e:
        raise UsageError(str(e) if INSTALL_HINT in str(e) else
                         f"cmd-online report could not import {e.name or 'a module'} ({e}): {INSTALL_HINT}") from None
    print(f"wrote {index}: open it in a browser")


def _export(args) -> None:
    from . import saved
    from .files import atomic_save

    sources = _sources(args.trajectory, args.callback)
    if len(sources) > 1:
        raise ValueError(f"{args.trajectory!r} holds several CMD states ({', '.join(s[0] for s in sources)}); "
                         "choose one with --callback KEY")
    label, traj, _ = sources[0]
    state = {name: tensor.clone() for name, tensor in traj.state_dict(args.at).items()}
    record = args.at % traj.num_records
    what = f"CMD weights at record {record} of {traj.num_records} ({len(state)} tensors, {traj.num_weights:,} weights)"
    source, output = Path(args.trajectory), str(args.output)
    target = Path(output).resolve()
    if target == source.resolve() or target in source.resolve().parents:
        raise ValueError(f"-o {output!r} would replace {str(source)!r}, the file or folder the CMD model is read from "
                         f"(and the training state in it): write the export elsewhere")
    plain = output.endswith((".pt", ".pth"))  # a state_dict file, whatever the source
    if source.is_dir() and not plain:
        _export_model_folder(source, state, output)
        print(f"wrote {output}: a model folder as the Trainer saves it, with the {what}; load with "
              f"AutoModel.from_pretrained({output!r}) or the model's own class")
        return
    checkpoint = None if source.is_dir() or plain else saved.lightning_checkpoint(source)
    if checkpoint is not None:
        atomic_save(saved.with_weights(checkpoint, state), output)
        print(f"wrote {output}: a Lightning checkpoint with the {what}; load with "
              f"LitModel.load_from_checkpoint({output!r})")
        return
    atomic_save(state, output)
    print(f"wrote {output}: {what}; load with model.load_state_dict(torch.load({output!r}))")


def _export_model_folder(source: Path, state: dict, output: str) -> None:
    """The checkpoint folder's model files (config, tokenizer, …; no optimizer or trainer state) with the CMD
    weights in model.safetensors, written beside ``output`` and renamed into place."""
    import shutil

    from safetensors.torch import save_file

    from . import saved
    from .files import replace_folder

    weights = saved.read_model_folder(source)
    weights = saved.replace_entries(weights, state)

    def fill(folder: str) -> None:
        for item in source.iterdir():
            if item.is_file() and saved.is_model_file(item.name):
                shutil.copy2(item, Path(folder) / item.name)
        seen, out = set(), {}
        for name, value in weights.items():  # safetensors refuses shared storage
            value = value.detach().contiguous()
            if value.numel() and value.untyped_storage().data_ptr() in seen:
                value = value.clone()
            seen.add(value.untyped_storage().data_ptr())
            out[name] = value
        save_file(out, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})

    replace_folder(output, fill)


def _checkpoint_paths(items: Sequence[str]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The checkpoints to decompose, in record order, and those a folder holds that are left out (with why)."""
    from . import saved

    if len(items) == 1 and Path(items[0]).is_dir() and not saved.is_model_folder(items[0]):
        folder = Path(items[0])
        paths, skipped = saved.run_checkpoints(folder)
        if len(paths) < 2:
            raise ValueError(f"folder {str(folder)!r} holds {len(paths)} checkpoint(s) (files "
                             f"{', '.join(saved.CHECKPOINT_SUFFIXES)}, or checkpoint-N folders); decompose needs "
                             "at least 2 checkpoints")
        return paths, skipped
    paths = [Path(item) for item in items]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"checkpoint file not found: {str(path)!r}")
        if path.is_dir() and not saved.is_model_folder(path):
            raise ValueError(f"{str(path)!r} is a folder without model weights; give either one folder or checkpoint "
                             "files (or checkpoint-N folders)")
    if len(paths) < 2:
        raise ValueError(f"decompose needs at least 2 checkpoints, one per record; got {len(paths)}")
    return paths, []


class _Checkpoints(collections.abc.Sequence):
    """Checkpoint files read one at a time when the decomposition asks, refusing this library's own files."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        from .files import read_checkpoint

        return read_checkpoint(self.paths[i])


def _decompose(args) -> None:
    from .config import CMDConfig
    from .posthoc import decompose_checkpoints

    # Options are checked before any file is read (those that need N or T are checked by decompose).
    CMDConfig(modes=args.modes, threshold=args.threshold, samples=args.samples, seed=args.seed, warmup=args.warmup,
              distance=args.distance, max_modes=args.max_modes)
    paths, skipped = _checkpoint_paths(args.checkpoints)
    target = Path(args.output).resolve()
    overwritten = [str(p) for p in paths if Path(p).resolve() == target or target in Path(p).resolve().parents]
    if overwritten:
        raise ValueError(f"-o {str(args.output)!r} would replace the checkpoint {overwritten[0]!r} it reads: write the "
                         f"trajectory elsewhere")
    if len(args.checkpoints) == 1:  # a folder: say which of its entries are the records
        print(textwrap.fill(f"records: {len(paths)} checkpoints, in this order: {', '.join(p.name for p in paths)}",
                            width=100, subsequent_indent="  "))
        for path, why in skipped:
            print(f"left out: {path.name} ({why})")
    traj = decompose_checkpoints(_Checkpoints(paths), modes=args.modes, threshold=args.threshold,
                                 samples=args.samples, seed=args.seed, warmup=args.warmup, distance=args.distance,
                                 max_modes=args.max_modes)
    traj.save(args.output)
    print(f"wrote {args.output}: {traj.num_modes} modes over {traj.num_weights:,} weights and "
          f"{traj.num_records} records (from {len(paths)} checkpoints)")


# ------------------------------------------------------------------------------------------- entry
def _fail(message: str, code: int = 2) -> int:
    first = " ".join(str(message).split())  # exactly one line
    print(f"{PROG}: error: {first}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        args.run(args)
    except UsageError as e:
        return _fail(str(e))
    except BrokenPipeError:  # output piped into e.g. `head`, which has exited: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except USER_ERRORS as e:
        return _fail(str(e) or type(e).__name__)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
