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


# ------------------------------------------------------------------------------------------ 14
def tracked_recorder(**kw):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = recorder(opt, model, **{"modes": 3, **kw})
    walk(list(model.parameters()), 6, rec)
    return model, rec


def fresh(model, **kw):
    return recorder(torch.optim.SGD(model.parameters(), lr=0.1), model, **{"modes": 3, **kw})


def flipped_bits(data: bytes, count: int, seed: int = 0):
    """``data`` with one bit flipped, at ``count`` positions spread over the whole file (seeded)."""
    rng = np.random.default_rng(seed)
    for bit in rng.choice(len(data) * 8, size=count, replace=False):
        out = bytearray(data)
        out[bit // 8] ^= 1 << (bit % 8)
        yield bytes(out)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch.load of a flipped pickle opcode
@pytest.mark.parametrize("freeze", [None, 2])
def test_14_a_flipped_bit_in_a_saved_recorder_state_is_refused_or_harmless(freeze):
    """torch.save(rec.state_dict()) as the how-to writes it, one bit flipped, torch.load and load_state_dict:
    never different values (before the checksum, many flips loaded different values)."""
    import io

    from _states import assert_same, leaves
    model, rec = tracked_recorder(freeze_modes_after=freeze)
    buffer = io.BytesIO()
    torch.save(rec.state_dict(), buffer)
    expected = leaves(rec.state_dict())
    counts = {"refused": 0, "identical": 0}
    for data in flipped_bits(buffer.getvalue(), 300):
        target = fresh(model, freeze_modes_after=freeze)
        try:
            target.load_state_dict(torch.load(io.BytesIO(data), weights_only=True))
        except Exception:  # noqa: BLE001 - torch.load's own errors, or the recorder's ValueError
            counts["refused"] += 1
            assert target.num_records == 0
            continue
        finally:
            target.close()
        assert_same(leaves(target.state_dict()), expected)
        counts["identical"] += 1
    assert counts["refused"] > 150 and counts["identical"] > 10, counts


def test_14_a_damaged_statistic_is_refused_with_a_clear_error_and_changes_nothing():
    model, rec = tracked_recorder()
    state = rec.state_dict()
    name = next(iter(state["stats"]["mean"]))
    damaged = {**state, "stats": {**state["stats"], "mean": {**state["stats"]["mean"]}}}
    value = damaged["stats"]["mean"][name].clone()
    value.view(torch.int32).view(-1)[3] ^= 1 << 4  # one bit of one value
    damaged["stats"]["mean"][name] = value
    target = fresh(model)
    with pytest.raises(ValueError, match=r"the statistics do not match their checksum .*: the state is damaged"):
        target.load_state_dict(damaged)
    assert target.num_records == 0
    target.load_state_dict(state)  # the undamaged state loads
    assert target.num_records == 6


def test_14_a_state_saved_after_a_later_record_is_refused():
    """state_dict() holds references: a state kept past the next record no longer matches its checksum."""
    model, rec = tracked_recorder()
    state = rec.state_dict()
    walk(list(model.parameters()), 1, rec, start=6)
    with pytest.raises(ValueError, match=r"saved after a later record changed the recorder's tensors"):
        fresh(model).load_state_dict(state)


def test_14_a_flipped_bit_in_the_packed_meta_is_refused():
    from cmd_online.files import pack, unpack
    model, rec = tracked_recorder()
    state = rec.state_dict()
    meta = state["meta"]
    history = unpack(meta)["history"]
    pos = meta.find(history[0].numpy().tobytes()[:8])
    assert pos > 0
    bad = bytearray(meta)
    bad[pos + 2] ^= 0x10
    with pytest.raises(ValueError, match=r"state\['meta'\] is not readable .*CRC"):
        fresh(model).load_state_dict({**state, "meta": bytes(bad)})
    # torch.serialization.set_crc32_options(False) does not take the CRC-32s away from the packed meta
    torch.serialization.set_crc32_options(False)
    try:
        blob = pack({"x": torch.arange(5.0)})
    finally:
        torch.serialization.set_crc32_options(True)
    import io
    import zipfile
    assert all(info.CRC for info in zipfile.ZipFile(io.BytesIO(blob)).infolist() if info.file_size)


def test_14_a_state_without_a_checksum_still_loads():
    from _states import edit_meta
    model, rec = tracked_recorder()
    old = edit_meta(rec.state_dict(), lambda meta: meta.pop("checksum"))
    target = fresh(model)
    target.load_state_dict(old)
    same_trajectory(target.trajectory(), rec.trajectory())


def small_trajectory(N=600, T=8):
    g = torch.Generator().manual_seed(0)
    return cmdo.CMDTrajectory(torch.randn(3, T, generator=g), torch.tensor([5, 100, 400]),
                              torch.randn(N, generator=g), torch.randn(N, generator=g),
                              torch.randint(0, 3, (N,), generator=g, dtype=torch.int32), 2,
                              mode_r2=torch.rand(3, generator=g), set_aside=torch.tensor([False, True, False]))


@pytest.mark.parametrize("crc32", [True, False])
def test_14_a_flipped_bit_in_a_trajectory_file_is_refused_or_harmless(tmp_path, crc32):
    """Also for a file written with torch's zip CRC-32s off, which nothing could check before."""
    original = small_trajectory()
    path = tmp_path / "traj.cmd"
    torch.serialization.set_crc32_options(crc32)
    try:
        original.save(path)
    finally:
        torch.serialization.set_crc32_options(True)
    counts = {"refused": 0, "identical": 0}
    bad = tmp_path / "bad.cmd"
    for data in flipped_bits(path.read_bytes(), 300, seed=1):
        bad.write_bytes(data)
        try:
            loaded = cmdo.CMDTrajectory.load(bad)
        except ValueError as e:
            assert str(bad) in str(e)
            counts["refused"] += 1
            continue
        same_trajectory(loaded, original)
        for name in ("mode_r2", "set_aside"):
            assert torch.equal(getattr(loaded, name), getattr(original, name))
        assert loaded.window_start == original.window_start and loaded.layout == original.layout
        counts["identical"] += 1
    assert counts["refused"] > 100, counts


def test_14_a_damaged_trajectory_value_names_the_file(tmp_path):
    original = small_trajectory()
    path = tmp_path / "traj.cmd"
    original.save(path)
    payload = torch.load(path, weights_only=True)
    payload["b"][7] = payload["b"][7].nextafter(torch.tensor(10.0))  # one ulp: every field check passes
    torch.save(payload, path)  # fresh zip CRC-32s: only the file's own checksum can tell
    with pytest.raises(ValueError, match=rf"'{path}' is a damaged CMD trajectory file: its fields do not match "
                                         r"their checksum .*corrupted"):
        cmdo.CMDTrajectory.load(path)
    del payload["checksum"]  # a file of an earlier cmd_online: loads
    torch.save(payload, path)
    assert torch.equal(cmdo.CMDTrajectory.load(path).b, payload["b"])


def test_14_trajectory_state_dict_carries_a_checksum_of_a_b_and_the_modes():
    _, rec = tracked_recorder()
    state = rec.trajectory_state_dict()
    same_trajectory(cmdo.CMDTrajectory.from_state_dict(state), rec.trajectory())
    name = next(iter(state["a"]))
    state["a"][name] = state["a"][name].clone()
    state["a"][name].view(-1)[0] += 1e-3
    with pytest.raises(ValueError, match=r"state's a, b and modes do not match their checksum"):
        cmdo.CMDTrajectory.from_state_dict(state)


def test_4_decompose_checkpoints_matches_names_through_torch_compile(tmp_path):
    """Checkpoints of one run, the later ones saved from torch.compile(model) (``_orig_mod.`` keys)."""
    g = torch.Generator().manual_seed(0)
    checkpoints = []
    for t in range(5):
        sd = {"0.weight": torch.randn(5, 6, generator=g), "0.bias": torch.randn(5, generator=g)}
        checkpoints.append(sd if t < 2 else {f"_orig_mod.{k}": v for k, v in sd.items()})
    traj = cmdo.decompose_checkpoints(checkpoints, modes=2, samples=20)
    plain = cmdo.decompose_checkpoints([{k.removeprefix("_orig_mod."): v for k, v in sd.items()}
                                        for sd in checkpoints], modes=2, samples=20)
    assert traj.layout.names == ("0.weight", "0.bias")
    same_trajectory(traj, plain)
    with pytest.raises(ValueError, match="different entries"):  # other names are still refused
        cmdo.decompose_checkpoints([checkpoints[0], {"x": checkpoints[1]["0.weight"]}], modes=2, samples=20)


def test_14_a_forked_child_computes_checksums_of_large_tensors():
    """The checksum's thread pool is the process's own: a child forked after the parent used it (as a
    DataLoader worker or a forked writer is) does not wait on the parent's threads."""
    import multiprocessing

    from cmd_online.files import checksum
    big = torch.arange(3_000_000, dtype=torch.float32)  # 12 MB: checked on the pool
    expected = checksum([("big", big)])
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        result = pool.apply_async(checksum, ([("big", big)],))
        assert result.get(timeout=60) == expected


@pytest.mark.parametrize("field", ["metrics", "sample_history"])
def test_14_the_report_fields_of_a_trajectory_file_are_under_its_checksum(tmp_path, field):
    base = small_trajectory()
    T, K = base.num_records, 4
    g = torch.Generator().manual_seed(3)
    original = cmdo.CMDTrajectory(base.references, base.reference_index, base.a, base.b, base.modes,
                                  base.window_start, mode_r2=base.mode_r2, set_aside=base.set_aside,
                                  sample_index=torch.arange(K), sample_history=torch.randn(K, 3, generator=g),
                                  sample_modes=torch.zeros(K, dtype=torch.long),
                                  metrics={"acc": torch.rand(T, generator=g), "loss": torch.rand(T, generator=g)})
    path = tmp_path / "traj.cmd"
    original.save(path)
    payload = torch.load(path, weights_only=True)
    values = payload[field]["acc"] if field == "metrics" else payload[field]
    values.view(-1)[1] = values.view(-1)[1].nextafter(torch.tensor(10.0))  # one ulp: every field check passes
    torch.save(payload, path)  # fresh zip CRC-32s: only the file's own checksum can tell
    with pytest.raises(ValueError, match=rf"'{path}' is a damaged CMD trajectory file"):
        cmdo.CMDTrajectory.load(path)
