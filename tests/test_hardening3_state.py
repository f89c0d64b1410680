"""Hardening round 3 (issue 22), state and data: resumes across parameter names, refusals at construction,
the number of modes asked for, checksums of the files and states the library writes.

The numbers in the test names follow the items of the issue; each test failed before its fix.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

import cmd_online as cmdo
from cmd_online.clustering import cluster


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


class Named(torch.nn.Module):
    """The same parameters as ``mlp`` under other submodule names."""

    def __init__(self, seed=0):
        super().__init__()
        net = mlp(seed)
        self.encoder, self.act, self.head = net[0], net[1], net[2]


def walk(params, records, rec=None, seed=0, start=0):
    """Move the parameters by seeded random steps (step t from ``start`` on), recording after each."""
    for t in range(start, start + records):
        g = torch.Generator().manual_seed(seed * 1000 + t)
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g), alpha=0.1)
        if rec is not None:
            rec.record()


def recorder(opt, model=None, **kw):
    return cmdo.CMDRecorder(opt, model, **{"modes": 2, "samples": 20, "warmup": 3, **kw})


def same_trajectory(x: cmdo.CMDTrajectory, y: cmdo.CMDTrajectory) -> None:
    for name in ("references", "reference_index", "a", "b", "modes"):
        assert torch.equal(getattr(x, name), getattr(y, name)), name


# ------------------------------------------------------------------------------------------ 4
@pytest.mark.parametrize("wrap", ["compile", "data_parallel", "no_model"])
def test_4_a_state_recorded_through_a_wrapper_resumes_the_plain_model(wrap):
    """Recorded on torch.compile(model) (``_orig_mod.`` names), DataParallel (``module.``) or without model=,
    resumed on the plain model: it loads and continues exactly as the uninterrupted run."""
    straight_model = mlp()
    straight = recorder(torch.optim.SGD(straight_model.parameters(), lr=0.1), straight_model)
    walk(list(straight_model.parameters()), 8, straight)

    model = mlp()
    wrapped = {"compile": lambda m: torch.compile(m), "data_parallel": torch.nn.DataParallel,
               "no_model": lambda m: None}[wrap](model)
    first = recorder(torch.optim.SGD(model.parameters(), lr=0.1), wrapped)
    if wrap != "no_model":
        assert first.layout.names[0] in ("_orig_mod.0.weight", "module.0.weight")
    walk(list(model.parameters()), 5, first)
    state = first.state_dict()

    resumed = recorder(torch.optim.SGD(model.parameters(), lr=0.1), model)
    resumed.load_state_dict(state)
    walk(list(model.parameters()), 3, resumed, start=5)
    same_trajectory(resumed.trajectory(), straight.trajectory())


def test_4_a_plain_state_resumes_a_wrapped_model_and_one_built_without_model():
    model = mlp()
    first = recorder(torch.optim.SGD(model.parameters(), lr=0.1), model)
    walk(list(model.parameters()), 5, first)
    state = first.state_dict()
    for target in (torch.compile(model), torch.nn.DataParallel(model), None):
        recorder(torch.optim.SGD(model.parameters(), lr=0.1), target).load_state_dict(state)


def test_4_a_renamed_submodule_is_refused_naming_the_names_and_loads_with_strict_false():
    model = mlp()
    first = recorder(torch.optim.SGD(model.parameters(), lr=0.1), model)
    walk(list(model.parameters()), 5, first)
    state = first.state_dict()
    named = Named()
    target = recorder(torch.optim.SGD(named.parameters(), lr=0.1), named)
    with pytest.raises(ValueError, match=r"other names: parameter 0 is '0.weight' in the state, 'encoder.weight' now;"
                                         r".*strict=False"):
        target.load_state_dict(state)
    assert target.num_records == 0  # nothing changed
    target.load_state_dict(state, strict=False)
    assert target.num_records == 5


def test_4_the_same_parameters_in_another_order_are_refused():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    model = torch.nn.ModuleDict({"a": a, "b": b})
    first = recorder(torch.optim.SGD([a.weight, b.weight], lr=0.1), model)
    walk([a.weight, b.weight], 4, first)
    target = recorder(torch.optim.SGD([b.weight, a.weight], lr=0.1), model)
    with pytest.raises(ValueError, match=r"the same ones in another order\): parameter 0 is 'a.weight' in the "
                                         r"state, 'b.weight' now; parameter 1 is 'b.weight' in the state"):
        target.load_state_dict(first.state_dict())


def test_4_other_shapes_are_named():
    model, other = mlp(), torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))
    first = recorder(torch.optim.SGD(model.parameters(), lr=0.1), model)
    walk(list(model.parameters()), 4, first)
    target = recorder(torch.optim.SGD(other.parameters(), lr=0.1), other)
    with pytest.raises(ValueError, match=r"other shapes than this optimizer's: '2.weight' is \(3, 5\) in the state, "
                                         r"\(4, 5\) now; '2.bias' is \(3,\) in the state, \(4,\) now"):
        target.load_state_dict(first.state_dict())


def test_4_name_matching_through_wrappers():
    from cmd_online.layout import name_differences as differ
    assert differ(["_orig_mod.0.weight"], ["0.weight"]) == []
    assert differ(["module.fc.weight", "module.fc.bias"], ["model.fc.weight", "model.fc.bias"]) == []
    assert differ(["base_model.model.x.weight", "base_model.model.y.bias"], ["x.weight", "y.bias"]) == []
    assert differ(["l._fsdp_wrapped_module._checkpoint_wrapped_module.weight"], ["l.weight"]) == []
    assert differ(["param_groups.0.params.0"], ["anything.weight"]) == []
    # a prefix that does not lead every name is a rename, not a wrapper
    assert differ(["enc.0.weight", "enc.0.bias", "dec.weight"], ["encoder.0.weight", "encoder.0.bias",
                                                                  "dec.weight"]) == [0, 1]
    assert differ(["weight", "bias"], ["bias", "weight"]) == [0, 1]


# ------------------------------------------------------------------------------------------ 6
def test_6_a_param_group_added_after_the_recorder_is_named_in_the_refusal():
    model, extra = mlp(), torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    first = recorder(opt, model)
    with pytest.warns(RuntimeWarning, match="add_param_group"):
        opt.add_param_group({"params": list(model[2].parameters())})
        walk(list(model.parameters()), 4, first)
    again = torch.optim.SGD(model[0].parameters(), lr=0.1)
    again.add_param_group({"params": list(model[2].parameters())})
    target = recorder(again, model)
    with pytest.raises(ValueError, match=r"recorded for 2 parameter tensors, but this recorder has 4 \(it also has "
                                         r"'2.weight', '2.bias'\).*add_param_group.*before add_param_group"):
        target.load_state_dict(first.state_dict())
    del extra


# ------------------------------------------------------------------------------------------ 7
def test_7_meta_device_parameters_are_refused_at_construction_by_name():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2, device="meta"))
    with pytest.raises(ValueError, match=r"parameter '1.weight' \(optimizer parameter 2\) is on the meta device"):
        recorder(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.raises(ValueError, match=r"optimizer parameter 2 is on the meta device"):
        recorder(torch.optim.SGD(model.parameters(), lr=0.1))


def test_7_uninitialized_lazy_parameters_are_refused_at_construction_by_name():
    model = torch.nn.Sequential(torch.nn.LazyLinear(3))
    with pytest.raises(ValueError, match=r"parameter '0.weight' \(optimizer parameter 0\) is an uninitialized "
                                         r"parameter of a lazy module"):
        recorder(torch.optim.SGD(model.parameters(), lr=0.1), model)


# ------------------------------------------------------------------------------------------ 8
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_8_float8_parameters_are_refused_at_construction_by_name_and_dtype(dtype):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[1].weight.data = model[1].weight.data.to(dtype)
    with pytest.raises(TypeError, match=rf"parameter '1.weight' \(optimizer parameter 2\) has dtype {dtype}; CMD "
                                        r"records float64, float32, float16 and bfloat16"):
        recorder(torch.optim.SGD(model.parameters(), lr=0.1), model)


# ------------------------------------------------------------------------------------------ 13
def planted(P, K=1000, F=20, seed=0, noise=3.0):
    """K float32 trajectories over F records: affine images of P independent white-noise signals plus
    independent noise, so the top merge heights of the linkage lie within 3·10⁻⁵ of each other (near 1)."""
    g = torch.Generator().manual_seed(seed)
    signals = torch.randn(P, F, generator=g, dtype=torch.float64)
    group = torch.arange(K) % P
    a = torch.randn(K, generator=g, dtype=torch.float64) + 3
    b = torch.randn(K, generator=g, dtype=torch.float64)
    return (a[:, None] * signals[group] + b[:, None] + noise * torch.randn(K, F, generator=g, dtype=torch.float64)).float()


def scipy_maxclust(history, modes):
    d = 1.0 - np.abs(np.corrcoef(history.double().numpy()))
    np.fill_diagonal(d, 0.0)
    tree = linkage(squareform(d, checks=False), method="complete")
    return len(set(fcluster(tree, modes, criterion="maxclust"))), tree[:, 2]


@pytest.mark.parametrize("planted_modes, modes", [(10, 2), (32, 3)])
def test_13_modes_m_gives_m_modes_where_the_top_merge_heights_differ(planted_modes, modes):
    for seed in range(3):
        history = planted(planted_modes, seed=seed)
        expected, heights = scipy_maxclust(history, modes)
        assert expected == modes and heights[-1] - heights[-modes] < 3e-5  # inside the old margin
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert cluster(history, modes=modes).num_modes == modes
            assert cluster(history, modes=modes, distance="euclidean").num_modes == modes


def test_13_the_recorder_and_decompose_give_the_modes_asked_and_agree():
    history = planted(10, K=1000, F=8, seed=1)  # the sampled weights are all the weights
    weights = torch.nn.Parameter(history[:, 0].clone())
    rec = cmdo.CMDRecorder(torch.optim.SGD([weights], lr=0.1), modes=2, samples=1000, warmup=8)
    for t in range(8):
        with torch.no_grad():
            weights.copy_(history[:, t])
        rec.record()
    post = cmdo.decompose(history, modes=2, samples=1000)
    assert rec.num_modes == post.num_modes == 2
    assert np.array_equal(rec.clustering.labels, cluster(history, modes=2).labels)
    assert torch.equal(rec.reference_index.sort().values, post.reference_index.sort().values)


def test_13_fewer_modes_than_asked_warn_with_the_number_found():
    g = torch.Generator().manual_seed(3)
    signals = torch.randn(3, 12, generator=g, dtype=torch.float64).cumsum(1)
    group = torch.arange(90) % 3
    a, b = torch.randn(90, generator=g, dtype=torch.float64) + 2, torch.randn(90, generator=g, dtype=torch.float64)
    copies = (a[:, None] * signals[group] + b[:, None]).float()  # three modes, apart from round-off
    with pytest.warns(RuntimeWarning, match=r"modes=10 asked, 3 found: the sampled trajectories form only 3 groups"):
        assert cluster(copies, modes=10).num_modes == 3
    with pytest.warns(RuntimeWarning, match=r"modes=4 asked, 1 found: none of the sampled trajectories moves"):
        assert cluster(torch.ones(5, 4), modes=4).num_modes == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cluster(copies, modes=3).num_modes == 3  # as many as asked: no warning
