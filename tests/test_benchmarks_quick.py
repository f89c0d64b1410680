"""Smoke runs of every benchmark script (--quick): they run, write their results and report sane values.

No timing is asserted; the numbers in docs/benchmarks.md come from the full runs of the same scripts.
"""

import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # the scripts set one thread; give the rest of the suite its setting back


def test_accuracy_quick_fills_every_column(tmp_path):
    lines = load("accuracy").main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "accuracy_quick.json").read_text())
    assert {ln["task"] for ln in lines} == {"digits", "mnist1d"}
    for run in saved["runs"]:
        for column in ("trained", "EMA", "SWA", "online CMD", "online CMD, full form", "post-hoc CMD"):
            assert 0.0 <= run[column] <= 100.0
        assert run["ema_decay"] in (0.9, 0.99, 0.999) and run["swa_start"] in (0.5, 0.75)
    assert (tmp_path / "accuracy_quick.csv").read_text().startswith("task,optimizer,seeds")


def test_modes_sweep_quick_reports_online_and_posthoc(tmp_path):
    lines = load("modes_sweep").main(["--quick", "--out", str(tmp_path)])
    methods = {(ln["method"], ln.get("M"), ln.get("K")) for ln in lines}
    assert ("online", 1, 200) in methods and ("post-hoc", 3, 50) in methods
    for ln in lines:
        if ln["method"] != "trained":
            assert 0.0 <= ln["err_window"][0] < 1.0  # CMD is closer to W than the initial weights are
    online = [r for r in json.loads((tmp_path / "modes_sweep_quick.json").read_text())["runs"] if r["method"] == "online"]
    assert online and all(r["freeze_modes_after"] is None for r in online)  # the full form, as docs/benchmarks.md §2 says


def test_dmd_compare_quick_reconstructs(tmp_path):
    lines = load("dmd_compare").main(["--quick", "--out", str(tmp_path)])
    by = {ln["method"]: ln for ln in lines}
    assert by["trained"]["err_all"][0] == 0.0
    assert set(by) >= {"DMD r=2", "node DMD r=5", "post-hoc CMD M=3", "online CMD M=3"}
    assert by["online CMD M=3"]["err_all"] is None and by["online CMD M=3"]["err_window"] is not None
    runs = json.loads((tmp_path / "dmd_compare_quick.json").read_text())["runs"]
    assert [r["freeze_modes_after"] for r in runs if r["method"] == "online CMD M=3"] == [None]  # the full form


def test_distance_compare_quick_reports_both_distances(tmp_path):
    (row,) = load("distance_compare").main(["--quick", "--out", str(tmp_path)])
    for d in ("correlation", "euclidean"):
        assert row[f"{d}_modes"] >= 1 and row[f"{d}_freeze_modes_after"] is None  # the full form (§3b)
        assert 0.0 <= row[f"{d}_online"] <= 100.0 and 0.0 <= row[f"{d}_posthoc"] <= 100.0
    assert -1.0 <= row["ari_samples"] <= 1.0
    assert json.loads((tmp_path / "distance_compare_quick.json").read_text())["runs"] == [row]


def test_cost_quick_measures_records_queries_and_memory(tmp_path, capsys):
    rows = load("cost").main(["--quick", "--out", str(tmp_path)])
    full, compact, naive = rows
    N, M = 10_000, 2
    assert full["modes_found"] == M and compact["modes_found"] == M
    assert full["stats_f32_per_weight"] == pytest.approx(M + 3, abs=0.01)  # shift, mean, S and M co-moments
    assert compact["stats_f32_per_weight"] == pytest.approx(3.25, abs=0.01)  # mean, S, p and a 1-byte mode (no shift)
    assert full["scratch_f32_per_weight"] == pytest.approx(1.0)  # one block of dx (N < a block here)
    assert compact["scratch_f32_per_weight"] == pytest.approx(3.0)  # dx, own y − ν, int32 modes
    assert compact["held_f32_per_weight"] == pytest.approx(6.25, abs=0.01)
    assert compact["compact_after_freeze"] and not full["compact_after_freeze"]
    assert math.isfinite(compact["freeze_excess_f32_per_weight"]) and "freeze_excess_f32_per_weight" not in full
    queries = {"cmd_parameters", "swapped", "cmd_state_dict", "export", "trajectory"}
    for r in (full, compact):
        others = {"record", "update", "ema_lerp", "sgd_momentum_step", "adam_step", "add_floor"}
        assert set(r["times_s"]) == others | queries
        assert {f"{q}/record" for q in queries} <= set(r["ratios"])
        assert all(math.isfinite(q["median"]) and q["median"] > 0 for q in r["ratios"].values())
        assert set(r["query_memory"]) == queries
        for name, m in r["query_memory"].items():
            # what the query returns or holds on purpose: the CMD weights (1 f32/weight); trajectory: a, b, modes
            assert m["output_f32_per_weight"] == pytest.approx(3.0 if name == "trajectory" else 1.0, abs=0.01)
            assert math.isfinite(m["extra_peak_f32_per_weight"])
    for r in (full, compact):  # the adoption figures (--summary): the most held after the warm-up, the state
        assert r["held_max_f32_per_weight"] >= r["held_f32_per_weight"]
        assert r["after_warmup_peak_f32_per_weight"] >= r["peak_f32_per_weight"]
        assert r["model_bytes"] == 4 * N and r["state_bytes"] > r["stats_f32_per_weight"] * 4 * N
        assert r["state_file_bytes"] >= r["state_bytes"] * 0.9
    assert naive["records_kept"] == 20 and naive["posthoc_fit_s"] > 0
    saved = json.loads((tmp_path / "cost_quick.json").read_text())
    assert saved["runs"][0]["N"] == N and saved["env"]["cmd_online"].endswith("cmd_online")
    # --render prints the tables of a saved run, those the docs quote: the same as at the end of the run
    assert load("cost").main(["--render", str(tmp_path / "cost_quick.json")]) == saved["runs"]
    out = capsys.readouterr().out
    assert out.count(load("cost").markdown(saved["runs"])) == 2


def test_update_variants_quick_times_every_kernel_and_form():
    med = load("update_variants").main(["--quick", "--device", "cpu"])["1e4"]
    assert set(med) == {"floor", "floorc", "ema", "fin", "full/blocks", "compact/blocks", "full/flat", "compact/flat"}
    assert all(math.isfinite(t) and t > 0 for t in med.values())


def test_guidance_sweep_quick_reports_per_epoch_and_per_step(tmp_path):
    lines = load("guidance_sweep").main(["--quick", "--out", str(tmp_path)])
    kinds = {(ln["task"], ln["kind"]) for ln in lines}
    assert {("digits", "per epoch"), ("digits", "per step"), ("mnist1d", "reference")} <= kinds
    step = next(ln for ln in lines if ln["kind"] == "per step")
    assert all(0 < v <= 1 for v in step["cmd_from"])  # the share of the steps before a CMD model exists
    assert all(0 <= e < 1 for e in step["err_window"])
    saved = tmp_path / "guidance_sweep_quick.json"
    assert load("guidance_sweep").main(["--render", str(saved)]) == json.loads(saved.read_text())["table"]


def test_lm_overhead_quick_times_every_variant():
    result = load("lm_overhead").run(rounds=3, burn_in=26, batch=2, quick=True)
    assert set(result["overhead"]) == {"default", "full", "EMA"}
    assert all(math.isfinite(o["median"]) for o in result["overhead"].values())
    assert tuple(result["phase_compact"]["full"]) == ("tracking", False)
    assert result["held_f32_per_weight"]["EMA"] == pytest.approx(1.0, abs=0.01)
    assert result["held_f32_per_weight"]["full"] > result["held_f32_per_weight"]["EMA"]


def test_mode_choice_quick_reproduces_both_recorders(tmp_path):
    runs, lines = load("mode_choice").main(["--quick", "--out", str(tmp_path)])
    (run,) = runs
    # the post-hoc rules "full form" and "fixed after 3" are the two recorders' own choices: the same
    # CMD weights up to float32 rounding, and the same accuracy
    assert set(run["check"]) == {"full form", "fixed after 3"}
    assert run["modes_differ"] == {"full form": 0, "fixed after 3": 0}
    assert max(run["check"].values()) < 1e-5
    for name in run["check"]:
        assert run["acc"][name] == pytest.approx(run["acc"][name + " (recorder)"], abs=1e-9)
    by = {ln["rule"]: ln for ln in lines}
    assert by["full form"]["all"] == (0.0, 0.0) and by["full form"]["agree"] == 1.0
    # candidates kept from the early records contain the early choice: more often the final mode
    assert by["best of top 2 at 3"]["hit"] >= by["fixed after 3"]["agree"]
    assert json.loads((tmp_path / "mode_choice_quick.json").read_text())["settings"]["task"] == "mnist1d"


def test_mode_choice_rules_reduce_to_the_full_form():
    """Every rule, given all M modes as candidates (or the whole window), is the full form's choice;
    and the fit it reconstructs from is the least-squares one."""
    import numpy as np

    mc = load("mode_choice")
    rng = np.random.default_rng(0)
    M, N, T = 5, 400, 30
    R = np.cumsum(rng.normal(size=(M, T)), 1)
    W = rng.normal(size=(N, 1)) * R[rng.integers(0, M, N)] + rng.normal(size=(N, T))
    window = list(range(4, T))
    full, _ = mc.choose(W, R, window, "full", 0, 0, rng)
    for kind, k in (("random", 0), ("row", 0), ("top", 3)):
        chosen, cand = mc.choose(W, R, window, kind, k, M, rng)
        assert np.array_equal(chosen, full) and cand.shape == (N, M)
    assert np.array_equal(mc.choose(W, R, window, "fixed", len(window), 1, rng)[0], full)
    some, _ = mc.choose(W, R, window, "fixed", 3, 1, rng)
    assert not np.array_equal(some, full)  # 3 records choose otherwise for some weights
    early, final = mc._scores(W, R, window[:3])[2], mc._scores(W, R, window)[2]
    chosen, cand = mc.choose(W, R, window, "top", 3, 2, rng)
    assert np.array_equal(np.sort(cand, 1), np.sort(np.argsort(-early, 1)[:, :2], 1))  # the 2 best after 3
    assert np.array_equal(chosen, cand[np.arange(N), final[np.arange(N)[:, None], cand].argmax(1)])
    _, rows = mc.choose(W, R, window, "row", 0, 3, rng)
    assert np.array_equal((rows - rows[:, :1]) % M, np.tile(np.arange(3), (N, 1)))  # b, b + 1, b + 2 (mod M)
    i = 7
    X = np.stack([R[full[i], window], np.ones(len(window))], 1)
    a, b = np.linalg.lstsq(X, W[i, window], rcond=None)[0]
    assert mc.reconstruct(W, R, window, full, T - 1)[i] == pytest.approx(a * R[full[i], T - 1] + b, rel=1e-9)
