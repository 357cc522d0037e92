"""The package's shape: layers whose imports point down only (import-linter), a top level of commands only, imports
at module top (the few lazy ones commented), no command's private names used elsewhere, and the modules that moved
in 0.2 still found under their old names (a sweep pickled by 0.1 resumes)."""

import ast
import logging
from pathlib import Path

import ray.cloudpickle
from importlinter.cli import lint_imports

from megl_ray.tuning import hooks, sweep

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "megl_ray"
COMMANDS = {"megl", "train", "tune", "evaluate", "explain", "export", "train_local"}
MAX_LOCAL_IMPORTS_PER_1000_LINES = 4


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        if "sample" not in path.relative_to(PACKAGE).parts[:2]:
            yield path, path.read_text(encoding="utf-8")


def test_the_import_contracts_hold():
    """Layers (commands → tuning → driver → training → reporting → evaluation → model → data → cluster → storage →
    config → cli/errors), no Ray in the model, losses and transforms, no command importing another."""
    # import-linter configures logging with disable_existing_loggers: every logger of the process is given back
    disabled = {
        name: lg.disabled for name, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)
    }
    try:
        code = lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True, no_logo=True)
    finally:
        for name, was in disabled.items():
            logging.getLogger(name).disabled = was
    assert code == 0


def test_the_top_level_holds_only_commands_cli_errors_and_init():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules == COMMANDS | {"cli", "errors", "__init__"}, modules - COMMANDS


def test_function_local_imports_are_few_and_each_says_why():
    lines, local = 0, []
    for path, source in _modules():
        lines += len(source.splitlines())
        tree = ast.parse(source)
        text = source.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node not in tree.body:
                above = text[node.lineno - 2].strip()
                local.append((f"{path.relative_to(REPO)}:{node.lineno}", above.startswith("# ")))
    assert len(local) * 1000 / lines <= MAX_LOCAL_IMPORTS_PER_1000_LINES, local
    assert all(commented for _, commented in local), [where for where, commented in local if not commented]


def test_no_module_imports_a_private_name_of_a_command():
    offenders = []
    for path, source in _modules():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").removeprefix("megl_ray.") in COMMANDS:
                offenders += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not offenders, offenders


def test_moved_modules_are_found_under_their_old_names():
    import megl_ray.training.console  # noqa: PLC0415
    import megl_ray.tune_hooks  # the old name itself is what is tested

    assert megl_ray.tune_hooks is hooks
    assert megl_ray.training.console.configure_driver.__module__ == "megl_ray.reporting.console"
    assert set(megl_ray.MOVED.values()) <= {m for m in _module_names()}


def _module_names():
    for path, _ in _modules():
        parts = path.relative_to(REPO).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_a_sweep_state_pickled_by_0_1_loads_with_the_new_modules():
    """``tests/data/sweep_state_0.1.pkl``: what Ray Tune keeps of a sweep (its scheduler, callback, trial-name
    creator and trial function), pickled by megl_ray 0.1 under ``megl_ray.tune_hooks`` and ``megl_ray.tune``."""
    blob = (REPO / "tests" / "data" / "sweep_state_0.1.pkl").read_bytes()
    assert b"megl_ray.tune_hooks" in blob
    state = ray.cloudpickle.loads(blob)
    assert isinstance(state["scheduler"], hooks.ResumableASHA)
    assert isinstance(state["callbacks"][0], hooks.InterruptAfter)
    assert state["trainable"] is sweep.run_trial and state["trial_name_creator"] is sweep.trial_name
