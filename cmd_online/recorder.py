"""CMDRecorder: online CMD of a training run, attached to any torch optimizer.

The recorder owns no math: sampling, clustering and the streaming statistics live in their own
modules. It turns optimizer steps into records, records into statistics, and statistics into CMD
weights, checkpoints and trajectories.
"""

from __future__ import annotations

import numbers
import contextlib
import math
import warnings
import weakref
from typing import Any, Iterator

import torch

from . import distributed as dist_utils
from .clustering import Clustering, check_mode_arguments, cluster
from .files import atomic_save
from .layout import GatherPlan, Layout
from .sampling import sample_indices
from .stats import AffineFit, StreamingMoments, mode_means
from .trajectory import CMDTrajectory, normalize_at, reconstruct

FORMAT = "cmd_online.CMDRecorder"
VERSION = 1
_STATE_KEYS = {"config", "layout", "num_records", "skipped_records", "steps", "sample_index", "history",
               "reference_index", "references", "stats", "shards"}


def _check_int(name: str, value: Any, low: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int ≥ {low}{' or None' if allow_none else ''}; "
                        f"got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be ≥ {low}; got {value}")
    return int(value)


class CMDRecorder:
    """Records the CMD model of a training run online, with bounded memory.

    Attaches to ``optimizer`` through its step hooks: the optimizer, LR schedulers, GradScaler,
    gradient clipping and closures keep working unchanged. During a warm-up of ``warmup`` records it
    keeps the history of ``samples`` sampled weights only; at the last warm-up record it clusters them
    into modes and fixes one reference weight per mode; from then on it keeps streaming statistics of
    every weight, from which the CMD weights at any record come out without the trajectory.

    Args:
        optimizer (torch.optim.Optimizer): the optimizer whose parameters are recorded, in its order.
        model (torch.nn.Module): the model, for ``cmd_state_dict``, ``export`` and names (default None).
            Only a weak reference is kept.
        modes (int): number of modes M (default 10 when ``threshold`` is None).
        threshold (float): or the in-mode distance t ∈ (0, 1]; M then follows from the data.
        samples (int): K, weights whose warm-up history is clustered; modes ≤ K ≤ N (default 1000).
        warmup (int): F ≥ 2, number of warm-up records (default 20).
        record_every (int): record after every k-th optimizer step; None (default): call :meth:`record`.
        freeze_modes_after (int): after this many records of tracking, fix each weight's mode and keep
            only its own co-moment (compact memory); None (default) keeps the full form.
        writer (SummaryWriter): a TensorBoard writer to log to after each record from the end of the
            warm-up on: reference values and memory every record, mode statistics on the interval below
            (default None; see docs/tensorboard.md).
        log_every (int): log mode sizes, R², residual, histograms and the mode-by-layer map every this
            many records (default 10): they need an O(M·N) pass over the statistics.
        seed (int): seed of the sampling (default 0).
        check_finite (bool): skip (with a warning) records whose weights hold NaN/Inf (default True).
            This reads one boolean per record on the host: free on CPU, one small synchronisation per
            record on a GPU.
        compile_update (bool): run the statistics update (full and compact form) through
            ``torch.compile``, fusing it into one loop per tensor, at a one-time compile cost of seconds
            to a minute (default False). On CPU it pays for large models and long runs (N ≳ 10^6, M ≤ 10;
            see docs/benchmarks.md); on CUDA the eager multi-tensor update was faster in every
            configuration we measured.
    """

    def __init__(self, optimizer, model: torch.nn.Module | None = None, *, modes: int | None = None,
                 threshold: float | None = None, samples: int = 1000, warmup: int = 20,
                 record_every: int | None = None, freeze_modes_after: int | None = None, writer=None,
                 log_every: int = 10, seed: int = 0, check_finite: bool = True, compile_update: bool = False):
        if not hasattr(optimizer, "param_groups") or not hasattr(optimizer, "register_step_post_hook"):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
        modes, threshold = check_mode_arguments(modes, threshold)
        samples = _check_int("samples", samples, 1)
        warmup = _check_int("warmup", warmup, 2)
        record_every = _check_int("record_every", record_every, 1, allow_none=True)
        freeze_modes_after = _check_int("freeze_modes_after", freeze_modes_after, 1, allow_none=True)
        log_every = _check_int("log_every", log_every, 1)
        seed = _check_int("seed", seed, 0)
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None; got {type(model).__name__}")
        if modes is not None and modes > samples:
            raise ValueError(f"modes ({modes}) must be ≤ samples ({samples})")
        if freeze_modes_after is not None and freeze_modes_after < 3:
            warnings.warn(f"freeze_modes_after={freeze_modes_after}: modes fixed from fewer than 3 records of the "
                          "window are arbitrary (all correlations are 0 or ±1); use ≥ 3", UserWarning, stacklevel=2)
        if warmup == 2:
            warnings.warn("warmup=2: any two records are perfectly correlated, so the clustering finds a "
                          "single mode; use warmup ≥ 3 for more than one", UserWarning, stacklevel=2)

        params = [p for group in optimizer.param_groups for p in group["params"]]
        if not params:
            raise ValueError("optimizer has no parameters to record")
        for i, p in enumerate(params):
            if not p.is_floating_point():
                raise TypeError(f"optimizer parameter {i} has dtype {p.dtype}; CMD records floating-point parameters")
        self._shards = dist_utils.ShardInfo.of(params, model)
        devices = {p.device for p in self._shards.local(params)}
        if len(devices) != 1:
            raise ValueError(f"all parameters must be on one device; got {sorted(map(str, devices))}")
        self.device = devices.pop()

        # weak references, as torch_ema keeps: dropping the model and optimizer frees the parameters
        self._optimizer = weakref.ref(optimizer)
        self._param_refs = [weakref.ref(p) for p in params]
        self._local_meta = [(w.shape, w.dtype) for w in self._shards.local(params)]  # queries need no live params
        self._model = None if model is None else weakref.ref(model)
        names = [f"param_groups.{g}.params.{j}"
                 for g, group in enumerate(optimizer.param_groups) for j in range(len(group["params"]))]
        if model is not None:  # the model's names where it has the parameter
            by_id = {id(p): n for n, p in model.named_parameters()}
            names = [by_id.get(id(p), name) for p, name in zip(params, names)]
        self.layout = Layout.of_tensors(params, names)
        N = self.layout.numel
        if samples > N:
            raise ValueError(f"samples ({samples}) must be ≤ the number of weights N = {N}")

        self.config = dict(modes=modes, threshold=threshold, samples=samples, warmup=warmup,
                           record_every=record_every, freeze_modes_after=freeze_modes_after, seed=seed)
        self.check_finite = bool(check_finite)
        self.compile_update = bool(compile_update)
        self.writer = writer
        self.log_every = log_every
        self.num_records = 0
        self.skipped_records = 0
        self._steps = 0
        self._warned_new_params = False
        self.sample_index = sample_indices(self.layout.sizes, samples, seed)
        self._sample_plan = self._shards.gather_plan(self.layout, self.sample_index, self.device)
        self._history = torch.zeros(samples, warmup, dtype=torch.float32, device=self.device)
        self.clustering: Clustering | None = None
        self.reference_index: torch.Tensor | None = None
        self._ref_plan: GatherPlan | None = None
        self._references: torch.Tensor | None = None  # M × capacity, columns [0, num_records) valid
        self._stats: StreamingMoments | None = None
        self._fit_cache: list[AffineFit] | None = None  # the last query's fit, until the statistics change
        self._hook = optimizer.register_step_post_hook(self._after_step)

    # ----------------------------------------------------------------------------- state
    @property
    def phase(self) -> str:
        """``"warmup"`` until the clustering is done, then ``"tracking"``."""
        return "warmup" if self.num_records < self.config["warmup"] else "tracking"

    @property
    def num_modes(self) -> int | None:
        """M, known once the warm-up has ended."""
        return None if self.reference_index is None else self.reference_index.numel()

    @property
    def window_start(self) -> int:
        """First record of the fit window (the last warm-up record, F − 1)."""
        return self.config["warmup"] - 1

    @property
    def params(self) -> list[torch.Tensor]:
        """The recorded parameters, in optimizer order (held weakly)."""
        params = [ref() for ref in self._param_refs]
        if any(p is None for p in params):
            raise RuntimeError("the parameters recorded by this CMDRecorder have been deleted (model and optimizer "
                               "dropped); cmd_parameters(), trajectory(), state_dict() and nbytes() still work")
        return params

    def _local_weights(self) -> list[torch.Tensor]:
        """This process's part of every parameter, flat, in float32 (a view where no cast is needed)."""
        return [w.detach().reshape(-1).float() for w in self._shards.local(self.params)]

    # ----------------------------------------------------------------------------- recording
    def _after_step(self, optimizer, args, kwargs) -> None:
        self._steps += 1
        every = self.config["record_every"]
        if every is not None and self._steps % every == 0:
            self.record()

    def record(self) -> bool:
        """Take one trajectory point now. Returns False if it was skipped (non-finite weights)."""
        optimizer = self._optimizer()
        if (not self._warned_new_params and optimizer is not None
                and sum(len(g["params"]) for g in optimizer.param_groups) != len(self._param_refs)):
            self._warned_new_params = True
            warnings.warn("CMDRecorder: the optimizer's parameters changed after the recorder was built "
                          "(add_param_group?); only the original parameters are recorded", RuntimeWarning,
                          stacklevel=2)
        weights = self._local_weights()
        if self.check_finite and not self._finite(weights):
            return False
        t = self.num_records
        F = self.config["warmup"]
        if t < F:
            self._history[:, t] = self._shards.assemble(self._sample_plan(weights))
        if t == F - 1:
            self._start_tracking()
        if t >= F - 1:
            refs = self._shards.assemble(self._ref_plan(weights))
            self._store_reference(t, refs)
            self._stats.update(weights, refs)
            self._fit_cache = None  # stale now: free its 4 floats per weight
            if self.config["freeze_modes_after"] == self._stats.count:
                self._stats.freeze([f.modes for f in self._compute_fit()])
        self.num_records += 1
        if self.writer is not None and t >= F - 1:
            self._log_safely(self.writer, self.num_records - 1)
        return True

    def _finite(self, weights: list[torch.Tensor]) -> bool:
        norms = torch.stack(torch._foreach_norm(weights)) if weights else torch.zeros(0)
        finite = self._shards.all_ranks(torch.isfinite(norms))
        if bool(finite.all()):
            return True
        # rare path: the L2 norm overflows for |w| ≳ 1e19 although every value is finite; decide exactly
        finite = self._shards.all_ranks(torch.stack([torch.isfinite(w).all() for w in weights]))
        if bool(finite.all()):
            return True
        bad = [self.layout.names[i] for i in torch.nonzero(~finite).flatten().tolist()]
        self.skipped_records += 1
        warnings.warn(f"CMDRecorder: record {self.num_records} skipped: non-finite (NaN/Inf) values in "
                      f"{', '.join(bad[:5])}{' …' if len(bad) > 5 else ''}; the statistics are unchanged",
                      RuntimeWarning, stacklevel=3)
        return False

    def _start_tracking(self) -> None:
        """End of warm-up: cluster the sampled history, fix the references (Algorithm 1, steps 2–4)."""
        found = cluster(self._history, self.config["modes"], self.config["threshold"])
        self.clustering = found
        position = torch.from_numpy(found.reference)
        self.reference_index = self.sample_index[position]
        self._ref_plan = self._shards.gather_plan(self.layout, self.reference_index, self.device)
        M = len(position)
        capacity = max(2 * self.config["warmup"], 64)
        self._references = torch.zeros(M, capacity, dtype=torch.float32, device=self.device)
        self._references[:, :self.config["warmup"]] = self._history[position.to(self.device)]
        self._stats = StreamingMoments([w.numel() for w in self._local_weights()], M, self.device,
                                       compiled=self.compile_update)

    def _store_reference(self, t: int, refs: torch.Tensor) -> None:
        if t >= self._references.shape[1]:
            grown = torch.zeros(self._references.shape[0], 2 * self._references.shape[1],
                                dtype=self._references.dtype, device=self.device)
            grown[:, :t] = self._references[:, :t]
            self._references = grown
        self._references[:, t] = refs

    # ----------------------------------------------------------------------------- queries
    def _require_tracking(self, what: str) -> None:
        if self.phase == "warmup":
            remaining = self.config["warmup"] - self.num_records
            raise RuntimeError(f"{what} is not available during the warm-up: {remaining} more record(s) "
                               f"needed (warmup={self.config['warmup']}, recorded {self.num_records})")

    def _fit(self) -> list[AffineFit]:
        """Per-tensor fit from the statistics, cached until the next record changes them."""
        if self._fit_cache is None:
            self._fit_cache = self._compute_fit()
        return self._fit_cache

    def _compute_fit(self) -> list[AffineFit]:
        """Per-tensor fit from the statistics; a, b in float32."""
        fits = self._stats.fit()
        tensor, offset = self.layout.locate(self.reference_index)
        for m, (t, o) in enumerate(zip(tensor.tolist(), offset.tolist())):
            o = self._shards.local_offset(t, o)
            if o is not None:  # a reference reproduces itself exactly
                f = fits[t]
                f.modes[o], f.a[o], f.b[o], f.r2[o] = m, 1.0, 0.0, 1.0
        return [AffineFit(f.modes.to(torch.int32), f.a.float(), f.b.float(), f.r2.float()) for f in fits]

    def cmd_parameters(self, at: int = -1) -> list[torch.Tensor]:
        """CMD weights at record ``at``, one tensor per optimizer parameter (local shards under FSDP)."""
        self._require_tracking("cmd_parameters")
        at = normalize_at(at, self.num_records)
        column = self._references[:, at]
        return [reconstruct(f.a, f.b, f.modes, column).view(shape).to(dtype)
                for f, (shape, dtype) in zip(self._fit(), self._local_meta)]

    def _live_model(self) -> torch.nn.Module:
        if self._model is None:
            raise ValueError("this needs the model: pass model= to CMDRecorder(optimizer, model)")
        model = self._model()
        if model is None:
            raise RuntimeError("the model given to CMDRecorder has been deleted; "
                               "keep a reference to it while you use the recorder")
        return model

    def cmd_state_dict(self, at: int = -1) -> dict[str, torch.Tensor]:
        """The model's state_dict with CMD weights for the recorded parameters (buffers are live)."""
        model = self._live_model()
        self._require_tracking("cmd_state_dict")
        params = self.params
        full = self._shards.full_tensors(self.cmd_parameters(at), params)
        by_id = {id(p): v for p, v in zip(params, full)}
        sd = model.state_dict(keep_vars=True)
        return {k: (by_id[id(v)] if id(v) in by_id else v).detach() for k, v in sd.items()}

    @contextlib.contextmanager
    def swapped(self, at: int = -1) -> Iterator[None]:
        """Context manager: CMD weights live in the parameters inside it; the trained ones come back on exit."""
        cmd = self.cmd_parameters(at)
        local = self._shards.local(self.params)
        saved = [p.detach().clone() for p in local]
        try:
            with torch.no_grad():
                for p, value in zip(local, cmd):
                    p.copy_(value)
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(local, saved):
                    p.copy_(value)

    def export(self, path, at: int = -1) -> None:
        """Write ``cmd_state_dict(at)`` as a normal checkpoint, atomically (rank 0 only when distributed).

        Load it with ``model.load_state_dict(torch.load(path))``.
        """
        sd = self.cmd_state_dict(at)
        if dist_utils.is_writer():
            atomic_save(sd, path)

    def trajectory(self) -> CMDTrajectory:
        """The CMD model so far, as a :class:`CMDTrajectory` (full tensors, gathered under FSDP)."""
        self._require_tracking("trajectory")
        fits = self._fit()
        a, b, modes, r2 = (self._shards.full_flat([getattr(f, k) for f in fits])
                           for k in ("a", "b", "modes", "r2"))
        M = self.num_modes
        return CMDTrajectory(self._references[:, :self.num_records].clone(), self.reference_index.clone(), a, b,
                             modes, self.window_start, self.layout, mode_means(modes, r2, M).float())

    def r2(self) -> list[torch.Tensor]:
        """Each weight's R² (ρ² with its mode's reference) over the window, per parameter (local shards)."""
        self._require_tracking("r2")
        return [f.r2 for f in self._fit()]

    def nbytes(self) -> dict[str, int]:
        """Bytes held in tensors by this recorder, by part (statistics, scratch, history, references, indices)
        and their ``total``; apart from the total, ``fit``: the fit cached by the last query until the next record."""
        size = lambda t: 0 if t is None else t.numel() * t.element_size()  # noqa: E731
        out = {
            "statistics": 0 if self._stats is None else self._stats.nbytes(),
            "scratch": 0 if self._stats is None else self._stats.scratch_nbytes(),
            "history": size(self._history),
            "references": size(self._references),
            "indices": size(self.sample_index) + size(self.reference_index),
        }
        out["total"] = sum(out.values())
        fits = self._fit_cache or []
        out["fit"] = sum(size(f.modes) + size(f.a) + size(f.b) + size(f.r2) for f in fits)  # not in total
        return out

    # ----------------------------------------------------------------------------- logging
    def log(self, writer, step: int | None = None) -> None:
        """Log mode statistics to a TensorBoard ``writer`` at ``step`` (default: the last record)."""
        from .tensorboard import log_record

        if dist_utils.is_writer():
            log_record(self, writer, self.num_records - 1 if step is None else step)

    def _log_safely(self, writer, step: int) -> None:
        try:
            self.log(writer, step)
        except Exception as e:  # logging must never stop training
            warnings.warn(f"CMDRecorder: logging at record {step} failed and was skipped: {e!r}",
                          RuntimeWarning, stacklevel=3)

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: config, counters, samples, history, references, statistics."""
        stats = None
        if self._stats is not None:
            stats = {"count": self._stats.count}
            for name, value in self._stats.tensors().items():
                stats[name] = [t.clone() for t in value] if isinstance(value, list) else value.clone()
        return {
            "format": FORMAT,
            "version": VERSION,
            "config": dict(self.config),
            "layout": self.layout.to_dict(),
            "num_records": self.num_records,
            "skipped_records": self.skipped_records,
            "steps": self._steps,
            "sample_index": self.sample_index.clone(),
            "history": self._history.clone(),
            "reference_index": None if self.reference_index is None else self.reference_index.clone(),
            "references": None if self._references is None else self._references[:, :self.num_records].clone(),
            "stats": stats,
            "shards": self._shards.describe(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`. Refuses (changing nothing) a state of another configuration."""
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError("state is not a CMDRecorder state_dict")
        if state.get("version") != VERSION:
            raise ValueError(f"CMDRecorder state_dict version {state.get('version')!r} is not supported "
                             f"(expected {VERSION})")
        missing = sorted(_STATE_KEYS - state.keys())
        if missing:
            raise ValueError(f"state is missing {', '.join(missing)}; it is not a complete CMDRecorder state_dict")
        for key, value in self.config.items():
            if state["config"].get(key) != value:
                raise ValueError(f"state was recorded with {key}={state['config'].get(key)!r}, but this recorder "
                                 f"has {key}={value!r}; build the recorder with the same configuration")
        if Layout.from_dict(state["layout"]).shapes != self.layout.shapes:
            raise ValueError("state was recorded for parameters of other shapes than this optimizer's")
        if state["shards"] != self._shards.describe():
            raise ValueError(f"state was recorded with sharding {state['shards']}, "
                             f"but this recorder has {self._shards.describe()}")
        if not torch.equal(state["sample_index"].cpu(), self.sample_index):
            raise ValueError("state has other sampled weights than this recorder (different seed or layout)")
        stats = None
        if state["stats"] is not None:
            s = state["stats"]
            M = s["ref_sumsq"].numel()
            local_sizes = [w.numel() for w in self._local_weights()]
            if [t.numel() for t in s["sumsq"]] != local_sizes:
                raise ValueError("state statistics do not match this process's parameter sizes")
            stats = StreamingMoments(local_sizes, M, self.device, compiled=self.compile_update)
            stats.restore(s)
        # everything checked: now change the recorder
        self.num_records = int(state["num_records"])
        self.skipped_records = int(state["skipped_records"])
        self._steps = int(state["steps"])
        self._history = state["history"].to(self.device, torch.float32).clone()
        self._stats = stats
        self._fit_cache = None
        if state["reference_index"] is None:
            self.reference_index = self._ref_plan = self._references = self.clustering = None
        else:
            self.reference_index = state["reference_index"].cpu().long()
            self._ref_plan = self._shards.gather_plan(self.layout, self.reference_index, self.device)
            refs = state["references"].to(self.device, torch.float32)
            capacity = max(2 * refs.shape[1], 64)
            self._references = torch.zeros(refs.shape[0], capacity, dtype=torch.float32, device=self.device)
            self._references[:, :refs.shape[1]] = refs

    def close(self) -> None:
        """Detach from the optimizer (no more records on step); flushes a writer if one was given."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.writer is not None and self.phase == "tracking" and dist_utils.is_writer():
            try:
                from .tensorboard import log_close

                log_close(self, self.writer)
            except Exception as e:
                warnings.warn(f"CMDRecorder: final logging failed and was skipped: {e!r}", RuntimeWarning)

    def __repr__(self) -> str:
        return (f"CMDRecorder(weights={self.layout.numel}, phase={self.phase!r}, records={self.num_records}, "
                f"modes={self.num_modes if self.num_modes is not None else self.config['modes']})")
