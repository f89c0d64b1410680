"""The package's shape: imports flow one way, and no module reads another object's private attributes."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cmd_online"
# the size targets (issue 21), measured with ast: lines from a definition's first line to its last
MAX_MODULE, MAX_CLASS, MAX_FUNCTION = 600, 400, 60
# the parts of CMDRecorder, below it: none of them imports the façade
FACADE_PARTS = ("cmd_online.recording", "cmd_online.offload", "cmd_online.checkpoint", "cmd_online.queries",
                "cmd_online.swap", "cmd_online.parameters")
# torch's multi-tensor kernels (torch._foreach_*) are the semi-public API torch.optim itself is built on
ALLOWED_PRIVATE = {("torch", "_foreach_")}


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def imported(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Package modules that ``name`` imports anywhere in its file (inside functions too)."""
    package = name if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists() else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def test_the_import_graph_of_the_package_has_no_cycle():
    trees = modules()
    graph = {name: imported(name, tree, set(trees)) - {"cmd_online"} for name, tree in trees.items()}
    assert graph["cmd_online.recorder"] >= {"cmd_online.recording", "cmd_online.observers"}  # the walk sees imports
    assert "cmd_online.tensorboard" in graph["cmd_online.shortcut"]  # including those inside functions
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", f"import cycle: {' → '.join(path + [node, nxt])}"
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_recorder_and_tensorboard_do_not_import_each_other():
    trees = modules()
    known = set(trees)
    assert "cmd_online.tensorboard" not in imported("cmd_online.recorder", trees["cmd_online.recorder"], known)
    assert "cmd_online.recorder" not in imported("cmd_online.tensorboard", trees["cmd_online.tensorboard"], known)


def test_no_module_reads_a_private_attribute_of_another_object():
    offences = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
                continue
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if isinstance(base, ast.Name) and any(base.id == mod and node.attr.startswith(prefix)
                                                  for mod, prefix in ALLOWED_PRIVATE):
                continue
            offences.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert not offences, "private attributes read across objects:\n" + "\n".join(offences)


def test_importing_the_package_imports_no_framework_or_plotting_library():
    code = ("import sys, cmd_online; "
            "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers', 'matplotlib', "
            "'tensorboard', 'cmd_online.tensorboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_observers_is_the_protocol_only_and_imports_no_implementation():
    trees = modules()
    assert imported("cmd_online.observers", trees["cmd_online.observers"], set(trees)) == set()
    names = {node.name for node in trees["cmd_online.observers"].body
             if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert names == {"RecorderObserver", "check_observers", "notify"}


def test_tensorboard_reads_the_summary_not_the_live_statistics():
    tree = modules()["cmd_online.tensorboard"]
    read = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert "summary" in read and "moments" not in read


def test_the_callbacks_swap_through_the_recorders_primitives():
    trees = modules()
    common = trees["cmd_online.integrations._common"]
    assert "Swap" not in {node.name for node in common.body if isinstance(node, ast.ClassDef)}
    for name in ("cmd_online.integrations._lightning", "cmd_online.integrations.transformers"):
        source = ast.unparse(trees[name])
        assert "Swap" not in source and "mark_swapped" not in source, name
        assert "start_recording" in source and "build_recorder" not in source, name  # one start-up, in _common


def test_each_duplicate_rule_has_one_home():
    """The coefficients' dtype (layout.coefficient_dtype), which process writes (distributed.is_writer), the run
    options (config.RunOptions), the tensor validator (layout.check_tensor)."""
    offences = []
    for name, tree in modules().items():
        source = ast.unparse(tree)
        if name != "cmd_online.layout" and "torch.float64 if" in source:
            offences.append(f"{name}: a coefficient-dtype rule of its own")
        if name != "cmd_online.distributed" and "get_rank() == 0" in source:
            offences.append(f"{name}: an 'only rank 0 writes' rule of its own")
        if name != "cmd_online.config" and "compile_update=True asks" in source:
            offences.append(f"{name}: checks run options itself")
        if name != "cmd_online.layout" and ("must be a dense tensor" in source or "holds NaN or Inf values" in source):
            offences.append(f"{name}: a tensor validator of its own")
    assert not offences, "\n".join(offences)


def test_no_module_class_or_function_is_over_its_size_target():
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        name = path.relative_to(PACKAGE.parent).as_posix()
        if len(source.splitlines()) > MAX_MODULE:
            offences.append(f"{name}: {len(source.splitlines())} lines (module ≤ {MAX_MODULE})")
        for node in ast.walk(ast.parse(source)):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef) and size > MAX_CLASS:
                offences.append(f"{name}:{node.lineno}: class {node.name}, {size} lines (≤ {MAX_CLASS})")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > MAX_FUNCTION:
                offences.append(f"{name}:{node.lineno}: {node.name}(), {size} lines (≤ {MAX_FUNCTION})")
    assert not offences, "\n".join(offences)


def test_the_parts_of_the_recorder_do_not_import_it_back():
    """The recording, the offload driver, the state format, the queries, the swap and the parameters sit below
    the façade; the recording knows no hooks, observers, worker or state format."""
    trees = modules()
    known = set(trees)
    graph = {name: imported(name, trees[name], known) for name in FACADE_PARTS}
    offences = [f"{name} imports {target}" for name, targets in graph.items() for target in targets
                if target == "cmd_online.recorder" or target.startswith("cmd_online.integrations")]
    assert not offences, "\n".join(offences)
    assert graph["cmd_online.recording"].isdisjoint({"cmd_online.offload", "cmd_online.checkpoint",
                                                     "cmd_online.observers", "cmd_online.queries",
                                                     "cmd_online.swap", "cmd_online.tensorboard"})
    assert "cmd_online.recording" not in graph["cmd_online.offload"]  # it drives any recording it is given


def _calls(tree: ast.AST, attribute: str) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == attribute]


def test_the_facade_waits_for_the_offload_worker_in_one_place():
    """``_locked`` (which the ``serialised`` decorator and the swap primitives enter) is the façade's only wait for
    the worker; the hand-off itself (submit, apply, deliver, wait) is offload.py's."""
    trees = modules()
    waits = []
    for name in ("cmd_online.recorder", "cmd_online.queries", "cmd_online.swap"):
        for function in ast.walk(trees[name]):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                waits += [f"{name}.{function.name}" for _ in _calls(function, "wait") + _calls(function, "settle")]
    assert waits == ["cmd_online.recorder._locked"]
    work = next(node for node in trees["cmd_online.offload"].body if isinstance(node, ast.FunctionDef)
                and node.name == "_work")
    assert "WeakMethod" not in ast.unparse(work), "the worker holds no method of its owner, weakly or not"


def test_one_home_for_the_state_format_and_the_kernel_decision():
    """The recorder's state is written and read in checkpoint.py (a version bump touches one file): other
    modules import only its writers and readers, none of the format's parts. The records are counted on the
    device in one place (``recording.Recording.counts_on_device``)."""
    trees = modules()
    public = {"write_state", "read_state", "write_trajectory_state", "load_trajectory", "read_meta",
              "check_parameters", "metrics_of_state"}
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("checkpoint") and node.level:
                parts = {alias.name for alias in node.names} - public
                assert not parts, f"{name} imports {sorted(parts)} of the state format"
        if name not in ("cmd_online.stats", "cmd_online.config", "cmd_online.recording"):
            assert "kernel == 'flat'" not in ast.unparse(tree), f"{name} asks which kernel the statistics run"
    assert ast.unparse(trees["cmd_online.recording"]).count("kernel == 'flat'") == 1
