"""The package's layers: lower layers never import higher ones; no hidden (function-local) imports.

Layers, bottom to top (docs/design.md, "Layers"):
0 foundation: config, validated settings and shared helpers, the reward registry, the toy world, RNG
1 algorithm: policy, objective, typed messages, sampling engine, schedules, flow step, trajectories
2 roles: backbone, rollout worker, samplers, rewards, learners, checkpoints, metrics, resources; and the
  builders of the tiny, toy and random backbones and the reward fixtures (``tpdm_rl.builders``)
3 controller and executors
4 applications: CLI, evaluation, export, sweeps

The runtime (layers 0-3) imports no builder: the applications resolve the backbone path for the controller.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"tpdm_rl": "tpdm_rl", "rollout": "tpdm_rl.rollout", "rewards": "tpdm_rl.rewards"}
LAYERS: dict[str, int] = {
    # the folders of tpdm_rl/ are the layers: core/ 0, algorithm/ 1, training/ 2-3, commands/ and cli.py 4
    "tpdm_rl": 0, "tpdm_rl.data": 0, "tpdm_rl.core": 0, "tpdm_rl.core.*": 0,
    "tpdm_rl.algorithm": 1, "tpdm_rl.algorithm.*": 1,
    "tpdm_rl.training": 2, "tpdm_rl.training.*": 2,
    "tpdm_rl.training.controller": 3, "tpdm_rl.training.runfolder": 3, "tpdm_rl.training.sanity": 3,
    "tpdm_rl.executors": 3, "tpdm_rl.executors.*": 3,
    "tpdm_rl.cli": 4, "tpdm_rl.commands": 4, "tpdm_rl.commands.*": 4, "tpdm_rl.evaluation": 4, "tpdm_rl.evaluation.*": 4,
    "tpdm_rl.sweep": 4, "tpdm_rl.sweep.*": 4,
    # rollout/ and rewards/ (beside tpdm_rl/, imported as tpdm_rl.rollout / tpdm_rl.rewards) hold two layers each
    "tpdm_rl.rollout": 0, "tpdm_rl.rollout.toy": 0, "tpdm_rl.rollout.flow": 1, "tpdm_rl.rollout.schedules": 1,
    "tpdm_rl.rollout.engine": 1, "tpdm_rl.rollout.trajectory": 1, "tpdm_rl.rollout.adaptive": 1, "tpdm_rl.rollout.*": 2,
    "tpdm_rl.rewards": 0, "tpdm_rl.rewards.*": 2,
    "tpdm_rl.builders": 2, "tpdm_rl.builders.*": 2,
}
#: the only packages a function may import lazily: optional heavy dependencies
LAZY_ALLOWED = ("ray", "deepspeed", "open_clip", "wandb")
#: and torch in two modules only: the thread policy must run before it loads; prompts are validated without it
LAZY_TORCH_MODULES = ("tpdm_rl.core.threads", "tpdm_rl.core.prompts")
#: the command-line modules import everything heavy inside their commands: --help and config errors stay fast
LAZY_ENTRY_PACKAGES = ("tpdm_rl.cli", "tpdm_rl.commands")
#: runtime packages -> the packages they must never import: rollout/ and rewards/ stand side by side, and neither
#: depends on the code that builds test and demo models
SEPARATE: dict[str, tuple[str, ...]] = {"tpdm_rl.rollout": ("tpdm_rl.rewards", "tpdm_rl.builders"),
                                        "tpdm_rl.rewards": ("tpdm_rl.rollout", "tpdm_rl.builders")}


def layer_of(module: str) -> int:
    if module in LAYERS:
        return LAYERS[module]
    parts = module.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) + ".*" in LAYERS:
            return LAYERS[".".join(parts[:i]) + ".*"]
    raise AssertionError(f"module {module} has no layer in tests/test_layers.py: classify it")


def modules() -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is_package)."""
    out = {}
    for folder, pkg in FOLDERS.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            rel = f.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = (f, rel.name == "__init__")
    return out


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = module.split(".") if is_pkg else module.split(".")[:-1]
        pkg = pkg[: len(pkg) - node.level + 1]
        base = ".".join(pkg + ([node.module] if node.module else []))
    names = [f"{base}.{a.name}" for a in node.names]
    return [base] + names


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in ast.walk(node):
                skip.add(id(sub))
    return skip


def imports_of(module: str, path: Path, is_pkg: bool) -> list[tuple[str, int, bool]]:
    """(imported module or symbol path, line, inside a function) of every import statement."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    local = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                local.add(id(sub))
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in local) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out += [(n, node.lineno, id(node) in local) for n in _resolve(module, is_pkg, node)]
    return out


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_lower_layers_never_import_higher_ones():
    mods = modules()
    bad = []
    for name, (path, is_pkg) in mods.items():
        mine = layer_of(name)
        for target, line, _ in imports_of(name, path, is_pkg):
            if target in mods and layer_of(target) > mine:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {name} (layer {mine}) imports {target} "
                           f"(layer {layer_of(target)})")
    assert not bad, "\n".join(bad)


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def forbidden_imports(mods: dict[str, tuple[Path, bool]], forbidden_for) -> list[str]:
    """Imports (top-level or inside functions) of a package that ``forbidden_for(module)`` names, one per line."""
    bad = []
    for name, (path, is_pkg) in mods.items():
        forbidden = forbidden_for(name)
        found: dict[int, str] = {}  # line -> the module it imports (one entry per import statement)
        for target, line, _ in imports_of(name, path, is_pkg) if forbidden else ():
            if any(_inside(target, f) for f in forbidden):
                found.setdefault(line, target)
        bad += [f"{path}:{line}: {name} imports {target}" for line, target in sorted(found.items())]
    return bad


def separation_violations(mods: dict[str, tuple[Path, bool]]) -> list[str]:
    """Imports from rollout/ or rewards/ into each other or into the builders."""
    return forbidden_imports(mods, lambda name: tuple(f for package, forbidden in SEPARATE.items()
                                                      if _inside(name, package) for f in forbidden))


def test_rollout_and_rewards_import_neither_each_other_nor_a_builder():
    bad = separation_violations(modules())
    assert not bad, "\n".join(bad)


def test_the_separation_check_sees_a_violation(tmp_path):
    """Not vacuous: a rollout module importing a reward, or a reward module importing a builder, is found."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from tpdm_rl.rewards.shapes import analyse\n")
    b.write_text("def f():\n    from tpdm_rl.builders.tiny_backbone import make_tiny_backbone\n")
    bad = separation_violations({"tpdm_rl.rollout.x": (a, False), "tpdm_rl.rewards.y": (b, False)})
    assert len(bad) == 2, bad


def builder_violations(mods: dict[str, tuple[Path, bool]]) -> list[str]:
    """Imports of ``tpdm_rl.builders`` by the runtime: every module below the applications (layers 0-3: the core,
    rollout/, rewards/, the controller and the executors) but the builders themselves. The applications
    (``tpdm-rl train``, the sweep trials) resolve ``backbone.path`` (an empty one builds the tiny backbone) and hand
    the controller the result."""
    return forbidden_imports(mods, lambda name: () if layer_of(name) > 3 or _inside(name, "tpdm_rl.builders")
                             else ("tpdm_rl.builders",))


def test_the_runtime_imports_no_builder():
    bad = builder_violations(modules())
    assert not bad, "\n".join(bad)


def test_the_builder_check_sees_a_violation(tmp_path):
    """Not vacuous: the controller or an executor importing a builder is found, an application is not."""
    a, b, c = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"
    a.write_text("from ..builders.tiny_backbone import resolve_backbone_path\n")
    b.write_text("def f():\n    from tpdm_rl.builders import tiny_backbone\n")
    c.write_text("from .builders.tiny_backbone import run_backbone_path\n")
    bad = builder_violations({"tpdm_rl.training.controller": (a, False), "tpdm_rl.executors.local": (b, False),
                              "tpdm_rl.cli": (c, False)})
    assert len(bad) == 2 and "tpdm_rl.cli" not in "".join(bad), bad


def test_function_local_imports_only_for_optional_heavy_dependencies():
    bad = []
    for name, (path, is_pkg) in modules().items():
        if any(_inside(name, p) for p in LAZY_ENTRY_PACKAGES):
            continue
        for target, line, local in imports_of(name, path, is_pkg):
            top = target.split(".")[0]
            if local and top not in LAZY_ALLOWED and not (top == "torch" and name in LAZY_TORCH_MODULES):
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {target} inside a function")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path):
    """The walker is not vacuous: an upward import in a lower layer is found."""
    f = tmp_path / "mod.py"
    f.write_text("from tpdm_rl.training.controller import Controller\n\ndef g():\n    import yaml\n")
    found = imports_of("tpdm_rl.algorithm.policy", f, False)
    assert ("tpdm_rl.training.controller", 1, False) in found and ("yaml", 4, True) in found
    assert layer_of("tpdm_rl.training.controller") > layer_of("tpdm_rl.algorithm.policy")


def test_static_reward_info_matches_the_classes():
    """Config validation reads the built-in rewards from their source (fast); it must say what the classes say."""
    from tpdm_rl.core import reward_registry as registry

    static = registry._static_builtin_info()
    assert set(static) == set(registry.BUILTIN_MODULES)
    for name, info in static.items():
        assert info == registry._info_of_class(registry.reward_class(name)), name


def test_the_cli_and_config_checks_load_no_model_library():
    """``tpdm-rl --help`` / ``config`` import neither torch nor diffusers, transformers, ray, deepspeed or matplotlib."""
    import subprocess
    import sys

    code = ("import sys; from tpdm_rl.cli import build_parser; build_parser(); from tpdm_rl.core.config_io import load_config; "
            "from tpdm_rl.core.prompts import load_prompts; c = load_config('configs/toy.yaml'); "
            "load_prompts(c.rollout.prompts); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'ray', 'deepspeed', 'matplotlib') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout


def import_graph(mods: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    """module -> the modules it imports (top level and inside functions; TYPE_CHECKING imports left out). ``from
    pkg import name`` points at ``pkg.name`` where that is a module, else at ``pkg``."""
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_nodes(tree)
        out: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                base, *names = _resolve(name, is_pkg, node)
                subs = {n for n in names if n in mods}
                out |= subs or ({base} if base in mods else set())
        graph[name] = out - {name}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_no_import_circle():
    """No two modules import each other, directly or around a ring, lazy imports included."""
    assert import_circles(import_graph(modules())) == []


def test_the_circle_check_sees_a_circle(tmp_path):
    """Not vacuous: a lazy import that closes a ring is found; a TYPE_CHECKING one is not."""
    a, b, c = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"
    a.write_text("from tpdm_rl.commands.y import f\n")
    b.write_text("def f():\n    from tpdm_rl.commands import x\n")
    c.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tpdm_rl.commands.x import g\n")
    mods = {"tpdm_rl.commands.x": (a, False), "tpdm_rl.commands.y": (b, False), "tpdm_rl.commands.z": (c, False)}
    assert import_circles(import_graph(mods)) == [["tpdm_rl.commands.x", "tpdm_rl.commands.y"]]
