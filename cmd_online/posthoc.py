"""Post-hoc CMD (paper, Algorithm 2) from a full N × T trajectory or from saved checkpoints."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from typing import Sequence

import numpy as np
import torch

from .clustering import cluster
from .config import CMDConfig, check_bool, check_int
from .files import read_checkpoint
from .layout import Layout, check_tensor, coefficient_dtype, core_name
from .progress import LOG, bar
from .sampling import sample_indices
from .stats import AffineFit, affine_fit, mode_means, pin_references, resolved_references
from .trajectory import CMDTrajectory

# Bound on the float64 temporaries of one chunk of rows (elements).
_CHUNK_ELEMENTS = 1 << 23


def _as_matrix(W) -> torch.Tensor:
    if isinstance(W, np.ndarray):
        W = torch.from_numpy(W)
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W must be a torch.Tensor or numpy array (N × T); got {type(W).__name__}")
    W = W.detach()  # the fit is arithmetic on the values, never part of a graph
    if W.dim() != 2:
        raise ValueError(f"W must be a 2-D matrix N × T (weights × records); got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise TypeError(f"W must hold floating-point values; got {W.dtype}")
    if W.shape[1] < 2:
        raise ValueError(f"W must have T ≥ 2 records (columns); got T = {W.shape[1]}")
    if W.shape[0] < 1:
        raise ValueError("W must have at least one weight (row)")
    rows = max(1, _CHUNK_ELEMENTS // W.shape[1])
    for start in range(0, W.shape[0], rows):
        if not torch.isfinite(W[start:start + rows]).all():
            raise ValueError("W contains NaN or Inf values; CMD needs finite weights")
    return W


def _result_dtype(W: torch.Tensor) -> torch.dtype:
    return coefficient_dtype([W.dtype])


def _reference_index(reference_index, N: int) -> torch.Tensor:
    """``reference_index`` as an int64 CPU vector of M ≥ 1 indices in [0, N)."""
    what = f"reference_index must be a non-empty vector of int indices in [0, {N})"
    if reference_index is None or isinstance(reference_index, (str, bytes)):
        raise TypeError(f"{what}; got {type(reference_index).__name__}")
    try:
        ref = torch.as_tensor(reference_index).cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{what}; got {type(reference_index).__name__}") from None
    if ref.dim() != 1 or ref.numel() < 1:
        raise ValueError(f"{what}; got shape {tuple(ref.shape)}")
    ref = check_tensor("reference_index", ref, "int").long()  # refuses float and bool; unsigned ints checked
    if int(ref.min()) < 0 or int(ref.max()) >= N:
        raise ValueError(f"{what}; got values from {int(ref.min())} to {int(ref.max())}")
    return ref


def fit_affine(W, reference_index, window_start: int = 0, layout: Layout | None = None) -> CMDTrajectory:
    """Assign every weight to a mode and fit a, b by least squares over records [window_start, T).

    This is the part of Algorithm 2 after clustering, computed exactly in float64 chunk by chunk
    (no Python loop over weights); it is also the oracle the online recorder is checked against.

    Args:
        W (tensor or array): N × T trajectory.
        reference_index (sequence of int): M flat indices of the reference weights (any integer dtype).
        window_start (int): first record of the fit window (default 0, the whole run).
        layout (Layout): names and shapes of the tensors the rows come from (default one flat tensor).

    A set-aside reference (it moves only by rounding in the window) gets R² = 0, as every weight that
    does not move; it still reproduces itself (a = 1, b = 0).
    """
    return _fit_affine(W, reference_index, window_start, layout)


def _fit_affine(W, reference_index, window_start: int = 0, layout: Layout | None = None, progress: bool | None = False,
                samples: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> CMDTrajectory:
    """:func:`fit_affine`, with a progress bar over the chunks and the clustered samples to keep."""
    W = _as_matrix(W)
    N, T = W.shape
    ref = _reference_index(reference_index, N)
    window_start = check_int("window_start", window_start)
    if not 0 <= window_start <= T - 2:
        raise ValueError(f"window_start must be in [0, T−2 = {T - 2}] so the window has 2 records; got {window_start}")
    if layout is not None:
        _check_layout_arg(layout, N)
    references = W[ref.to(W.device)].double()
    R = references[:, window_start:]
    ref_mean = R.mean(dim=1)
    Rc = R - ref_mean.unsqueeze(1)
    Q = (Rc * Rc).sum(dim=1)
    # the others move by rounding only: at the resolution of W's dtype, or of the reference's own parameter
    # (from layout) where that is coarser, as the recorder judges each reference
    eps = torch.full((ref.numel(),), torch.finfo(W.dtype).eps, dtype=torch.float64)
    if layout is not None:
        eps = torch.maximum(eps, layout.resolution(ref))
    resolved = resolved_references(Q, T - window_start, ref_mean, eps)
    Q = torch.where((R.amax(dim=1) > R.amin(dim=1)) & resolved, Q, torch.zeros_like(Q))
    rows = max(1, _CHUNK_ELEMENTS // T)
    fits = []
    chunks = range(0, N, rows)
    for start in bar(chunks, desc="fitting a, b", unit="chunk", enabled=progress if len(chunks) > 1 else False):
        chunk = W[start:start + rows, window_start:].double()
        moving = chunk.amax(dim=1) > chunk.amin(dim=1)
        mean = torch.where(moving, chunk.mean(dim=1), chunk[:, 0])  # a constant is its own mean, exactly
        centred = chunk - mean.unsqueeze(1)
        S = torch.where(moving, (centred * centred).sum(dim=1), torch.zeros_like(mean))
        P = Rc @ centred.T  # M × rows
        fits.append(affine_fit(P, S, Q, mean, ref_mean))
    fit = AffineFit(*(torch.cat(parts) for parts in zip(*((f.modes, f.a, f.b, f.r2) for f in fits))))
    M = ref.numel()
    set_aside = Q == 0
    pin_references(fit, ref.tolist(), range(M), (~set_aside).tolist())
    dtype = _result_dtype(W)
    sample_index, sample_history, sample_modes = samples if samples is not None else (None, None, None)
    return CMDTrajectory(references.to(dtype), ref, fit.a.to(dtype), fit.b.to(dtype), fit.modes, window_start,
                         layout if layout is not None else Layout.flat(N, W.dtype), mode_means(fit.modes, fit.r2, M),
                         set_aside.cpu(), sample_index, sample_history, sample_modes)


def _check_layout_arg(layout, N: int) -> None:
    if not isinstance(layout, Layout):
        raise TypeError(f"layout must be a Layout (cmd_online.layout.Layout); got {type(layout).__name__}")
    if layout.numel != N:
        raise ValueError(f"layout covers {layout.numel} weights but W has N = {N} rows")


def _layer_sizes(layer_sizes, N: int) -> list[int]:
    """``layer_sizes`` as a list of ints ≥ 0 that sum to N."""
    if isinstance(layer_sizes, (str, bytes)) or not isinstance(layer_sizes, Iterable):
        raise TypeError(f"layer_sizes must be a list of ints (the size of each layer) summing to N = {N}; "
                        f"got {type(layer_sizes).__name__}")
    sizes = [check_int(f"layer_sizes[{i}]", size, 0) for i, size in enumerate(layer_sizes)]
    if sum(sizes) != N:
        raise ValueError(f"layer_sizes must sum to N = {N}; got {sum(sizes)}")
    return sizes


def decompose(W, modes: int | None = None, threshold: float | None = None, samples: int = 1000, seed: int = 0,
              layer_sizes: Sequence[int] | None = None, warmup: int | None = None,
              layout: Layout | None = None, distance: str = "correlation",
              max_modes: int | None = None, progress: bool | None = None) -> CMDTrajectory:
    """Post-hoc CMD of a full trajectory (paper, Algorithms 1 and 2).

    Args:
        W (tensor or array): N × T matrix, one row per weight, one column per record.
        modes (int): number of modes M, cut with ``maxclust`` (default 10 when ``threshold`` is None).
        threshold (float): or the in-mode distance t ∈ (0, 1]: every pair in a mode has |corr| ≥ 1 − t.
        samples (int): K, number of sampled weights that are clustered (default 1000); modes ≤ K. More
            than N weights: all N are clustered, with a UserWarning.
        seed (int): seed of the sampling (default 0).
        layer_sizes (sequence of int): sizes of the layers for the layer-balanced sampling of appendix
            8.2 (default: from ``layout``, else one layer).
        warmup (int): None (default) clusters on all T records and fits a, b over all of them, as the
            paper does. F clusters on records 0..F−1 and fits over [F−1, T), exactly what the online
            recorder does with ``warmup=F``.
        layout (Layout): names, shapes and dtypes of the tensors the rows come from.
        distance (str): the clustering distance, ``"correlation"`` (1 − |C|, default) or ``"euclidean"``
            (between rows of |C|, the distance of the paper authors' code; docs/concepts.md).
        max_modes (int): with ``threshold``, at most this many modes (a cut that gives more is coarsened
            to ``max_modes``), as the recorder's ``max_modes`` (default None).
        progress (bool): a progress bar over the fit's chunks: None (default) on a terminal only, True
            whenever tqdm is installed, False never (``cmd_online.progress.bar``).

    The result keeps the clustered samples (``sample_index``, ``sample_history``, ``sample_modes``).
    """
    config = CMDConfig(modes=modes, threshold=threshold, samples=samples, seed=seed, warmup=warmup,
                       distance=distance, max_modes=max_modes)
    if progress is not None:
        check_bool("progress", progress)
    W = _as_matrix(W)
    N, T = W.shape
    config = config.for_weights(N, "decompose")  # samples > N: all N, with a warning
    if layout is not None:
        _check_layout_arg(layout, N)
    layer_sizes = _layer_sizes(layer_sizes, N) if layer_sizes is not None else \
        (layout.sizes if layout is not None else [N])
    if config.warmup is None:
        clustered, window_start = T, 0
    else:
        check_int("warmup", config.warmup, 2, T - 1)
        clustered, window_start = config.warmup, config.warmup - 1
    sample = sample_indices(layer_sizes, config.samples, config.seed)
    history = W[sample.to(W.device), :clustered]
    found = cluster(history, config.modes, config.threshold, config.distance, config.max_modes)
    reference_index = sample[torch.from_numpy(found.reference)]
    samples = (sample, history.detach().cpu().clone(), torch.from_numpy(found.labels))
    return _fit_affine(W, reference_index, window_start, layout, progress, samples)


def _floating_entries(sd: Mapping) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def _renamed_like(entries: dict, first: dict) -> dict:
    """``entries`` under ``first``'s names where the two sets differ only by wrappers' components
    (``_orig_mod``, FSDP1's, activation checkpointing's: :func:`cmd_online.layout.core_name`), one to one;
    ``entries`` unchanged otherwise."""
    ours, theirs = {core_name(k): k for k in entries}, {core_name(k): k for k in first}
    if len(ours) != len(entries) or len(theirs) != len(first) or ours.keys() != theirs.keys():
        return entries
    return {theirs[core]: entries[key] for core, key in ours.items()}


def decompose_checkpoints(checkpoints: Sequence, progress: bool | None = None, **kwargs) -> CMDTrajectory:
    """Post-hoc CMD from per-record checkpoints (state_dicts, or paths to files of them).

    The floating-point entries of each state_dict are flattened in order into one column of the
    N × T trajectory; the result's ``state_dict(at)`` has the checkpoints' names, shapes and dtypes.
    Paths are read with ``torch.load(weights_only=True)`` (:func:`cmd_online.files.read_checkpoint`);
    a file may nest the state_dict under ``"state_dict"`` or ``"model"``. Every checkpoint must have
    the same floating-point entries (in any order) with the same shapes; names that differ only by
    wrappers' components (``_orig_mod.`` of a model compiled for some records) are matched. Keyword
    arguments are those of :func:`decompose` (``layer_sizes`` defaults to the entries' sizes).

    ``progress``: a progress bar over the checkpoints and the fit: None (default) on a terminal only,
    True whenever tqdm is installed, False never. The time spent reading is logged (``cmd_online``
    logger, INFO).
    """
    if progress is not None:
        check_bool("progress", progress)
    if isinstance(checkpoints, (str, os.PathLike, Mapping)) or not isinstance(checkpoints, Sequence):
        raise TypeError("checkpoints must be a list of state_dicts or file paths, one per record")
    if len(checkpoints) < 2:
        raise ValueError(f"checkpoints must hold at least 2 records; got {len(checkpoints)}")
    first = _floating_entries(read_checkpoint(checkpoints[0], "checkpoints[0]"))
    if not first:
        raise ValueError("checkpoints[0] has no floating-point tensors")
    layout = Layout.of_tensors(list(first.values()), first.keys())
    W = torch.empty(layout.numel, len(checkpoints), dtype=torch.float32)
    start = time.perf_counter()
    for t, item in enumerate(bar(checkpoints, desc="reading checkpoints", unit="file", enabled=progress)):
        entries = first if t == 0 else _floating_entries(read_checkpoint(item, f"checkpoints[{t}]"))
        if entries.keys() != first.keys():  # saved through torch.compile (_orig_mod.) in some records only?
            entries = _renamed_like(entries, first)
        if entries.keys() != first.keys():  # the same entries, in any order: taken in checkpoints[0]'s
            raise ValueError(f"checkpoints[{t}] has different entries from checkpoints[0] "
                             f"(missing: {sorted(set(layout.names) - set(entries))[:5]}, "
                             f"extra: {sorted(set(entries) - set(layout.names))[:5]})")
        for name, shape, offset, size in zip(layout.names, layout.shapes, layout.offsets, layout.sizes):
            if tuple(entries[name].shape) != shape:
                raise ValueError(f"checkpoints[{t}][{name!r}] has shape {tuple(entries[name].shape)}, "
                                 f"but checkpoints[0] has {shape}")
            W[offset:offset + size, t] = entries[name].detach().reshape(-1).float().cpu()
    LOG.info("decompose_checkpoints: read %d checkpoints of %d weights in %.1f s", len(checkpoints), layout.numel,
             time.perf_counter() - start)
    return decompose(W, layout=layout, progress=progress, **kwargs)
