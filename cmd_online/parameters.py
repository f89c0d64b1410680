"""The parameters a recorder records: the optimizer's, in its order, held weakly (as torch_ema holds them:
dropping the model and optimizer frees them), checked once, named by the model where it has them, and
watched: parameters added to the optimizer, or replaced in the model, are said once and refused where
CMD weights would go to tensors the model no longer uses.
"""

from __future__ import annotations

import warnings
import weakref

import torch

from . import distributed as dist_utils
from .layout import RECORDABLE_DTYPES


class RecordedParameters:
    """The recorded parameters of ``optimizer`` (checked: :func:`_check_params`), and ``model`` (or None), held
    weakly; ``names`` (the model's where it has them) and ``shards`` (what this process holds of each)."""

    def __init__(self, optimizer, model: torch.nn.Module | None):
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None; got {type(model).__name__}")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        _check_params(params, model)
        self.names = _param_names(optimizer, params, model)
        self.shards = dist_utils.ShardInfo.of(params, model)
        self.dtypes = [p.dtype for p in params]  # as recorded
        self._optimizer = weakref.ref(optimizer)
        self._refs = [weakref.ref(p) for p in params]
        self._model = None if model is None else weakref.ref(model)
        self._warned_new = self._warned_replaced = False

    @property
    def has_model(self) -> bool:
        """Whether a model was given."""
        return self._model is not None

    def live(self) -> list[torch.Tensor]:
        """The parameters; a RuntimeError once they were deleted."""
        params = [ref() for ref in self._refs]
        if any(p is None for p in params):
            raise RuntimeError("the parameters recorded by this CMDRecorder have been deleted (model and optimizer "
                               "dropped); cmd_parameters(), trajectory(), state_dict() and nbytes() still work")
        return params

    def current_dtypes(self) -> list[torch.dtype]:
        """Each parameter's current dtype (the recorded one once the parameters are gone)."""
        return [recorded if p is None else p.dtype for recorded, p in zip(self.dtypes, (r() for r in self._refs))]

    def model(self) -> torch.nn.Module:
        """The model; a ValueError if none was given, a RuntimeError once it was deleted."""
        if self._model is None:
            raise ValueError("this needs the model: pass model= to CMDRecorder(optimizer, model)")
        model = self._model()
        if model is None:
            raise RuntimeError("the model given to CMDRecorder has been deleted; "
                               "keep a reference to it while you use the recorder")
        return model

    def warn_if_changed(self) -> None:
        """Warn once if the optimizer's parameters changed (add_param_group), and once if the model's were
        replaced, since the recorder was built."""
        optimizer = self._optimizer()
        if (not self._warned_new and optimizer is not None
                and sum(len(g["params"]) for g in optimizer.param_groups) != len(self._refs)):
            self._warned_new = True
            warnings.warn("CMDRecorder: the optimizer's parameters changed after the recorder was built "
                          "(add_param_group?); only the original parameters are recorded", RuntimeWarning,
                          stacklevel=4)
        if not self._warned_replaced and not self.shards.sharded:  # FSDP2 registers unsharded copies meanwhile
            replaced = self.replaced()
            if replaced:
                self._warned_replaced = True
                warnings.warn(f"CMDRecorder: {replaced}; the recorder records the tensors it was built on: build "
                              f"a new recorder (and optimizer) for the new parameters", RuntimeWarning, stacklevel=4)

    def replaced(self) -> str:
        """:func:`_replaced` of these parameters: which the model (else the optimizer) no longer holds."""
        model = None if self._model is None else self._model()
        return _replaced(model, self._optimizer(), [ref() for ref in self._refs], self.names, self.shards.sharded)

    def refuse_if_replaced(self, what: str) -> None:
        """``swapped``, ``cmd_state_dict`` and ``export`` would write into, or label as CMD, tensors the model
        no longer uses: refused."""
        replaced = self.replaced()
        if replaced:
            raise ValueError(f"{what}: {replaced}, so the CMD weights would go to tensors the model no longer "
                             f"uses; build a new recorder for the new parameters")


def _check_params(params: list, model: torch.nn.Module | None) -> None:
    """Every optimizer parameter recordable, once, and (given a model) one of the model's."""
    if not params:
        raise ValueError("optimizer has no parameters to record")
    first: dict[int, int] = {}
    for i, p in enumerate(params):
        if first.setdefault(id(p), i) != i:
            raise ValueError(f"optimizer parameter {i} is the same tensor as parameter {first[id(p)]}: each "
                             f"parameter must appear once in the optimizer's param_groups")
    names = {} if model is None else {id(p): n for n, p in model.named_parameters()}
    for i, p in enumerate(params):
        what = f"parameter {names[id(p)]!r} (optimizer parameter {i})" if id(p) in names \
            else f"optimizer parameter {i}"
        if isinstance(p, torch.nn.parameter.UninitializedParameter):
            raise ValueError(f"{what} is an uninitialized parameter of a lazy module (LazyLinear, …): run a "
                             f"forward pass first, then build the optimizer and the recorder")
        if not p.is_floating_point():
            raise TypeError(f"{what} has dtype {p.dtype}; CMD records floating-point parameters")
        if p.dtype not in RECORDABLE_DTYPES:  # float8 and smaller: no arithmetic to record them with
            raise TypeError(f"{what} has dtype {p.dtype}; CMD records float64, float32, float16 and bfloat16 "
                            f"parameters (float8 training keeps master weights in one of these: record those)")
        if p.layout != torch.strided:
            raise TypeError(f"{what} has layout {p.layout}; CMD records dense (strided) parameters")
        if p.is_meta:
            raise ValueError(f"{what} is on the meta device, so it holds no values to record: build the "
                             f"recorder once the parameters are materialised (model.to_empty(device=...) and "
                             f"initialised, or loaded)")
    if model is not None:
        owned = {id(p) for p in model.parameters()}
        foreign = [i for i, p in enumerate(params) if id(p) not in owned]
        if foreign:
            raise ValueError(f"model is not the optimizer's model: optimizer parameter(s) {foreign[:5]}"
                             f"{' …' if len(foreign) > 5 else ''} are not parameters of model; pass the "
                             f"model whose parameters the optimizer steps")


def _param_names(optimizer, params: list, model: torch.nn.Module | None) -> list[str]:
    names = [f"param_groups.{g}.params.{j}"
             for g, group in enumerate(optimizer.param_groups) for j in range(len(group["params"]))]
    if model is not None:  # the model's names where it has the parameter
        by_id = {id(p): n for n, p in model.named_parameters()}
        names = [by_id.get(id(p), name) for p, name in zip(params, names)]
    return names


def _replaced(model: torch.nn.Module | None, optimizer, params: list, names: tuple, sharded: bool) -> str:
    """Which recorded ``params`` the model (else the optimizer) no longer holds — replaced after the recorder
    was built, e.g. by ``model.load_state_dict(sd, assign=True)`` — as a sentence; "" if none."""
    holder = model if model is not None else optimizer
    if holder is None:
        return ""
    if model is not None:
        if sharded:  # FSDP2 holds its sharded parameters once its modules are resharded
            dist_utils.reshard(model)
        held = {id(p) for p in model.parameters()}
    else:
        held = {id(p) for group in holder.param_groups for p in group["params"]}
    gone = [name for name, p in zip(names, params) if p is not None and id(p) not in held]
    if not gone:
        return ""
    listed = ", ".join(repr(n) for n in gone[:5]) + (" …" if len(gone) > 5 else "")
    return (f"parameter(s) {listed} of the {'model' if model is not None else 'optimizer'} are no longer the "
            f"tensors recorded (replaced after the recorder was built, e.g. by load_state_dict(..., "
            f"assign=True) or a new nn.Parameter)")
