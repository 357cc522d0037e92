"""megl_ray.reporting.console: which of Ray's forwarded lines are dropped (routine ones only) and that the filter wraps
Ray's printer without losing anything else. Lines below were printed by a real 2-worker run of the tiny preset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_a_bad_flag_is_one_line_and_exit_2_for_every_cli(capsys):
    import importlib

    from megl_ray.cli import run_cli

    for module in (
        "megl_ray.train",
        "megl_ray.train_local",
        "megl_ray.tune",
        "megl_ray.storage",
        "megl_ray.data.make_sample",
        "megl_ray.data.convert",
        "megl_ray.evaluate",
        "megl_ray.explain",
    ):
        code = run_cli(module, importlib.import_module(module).main, ["--no-such-flag"])
        out, err = capsys.readouterr()
        assert code == 2, (module, err[-2000:])
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and err.startswith(module), module
        assert out.strip().splitlines()[-1].startswith('{"error": '), module
    # and through a real ``python -m`` entry point (the storage package's __main__)
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "megl_ray.storage", "serve", "--no-such-flag"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_every_command_answers_help_without_importing_torch_or_ray():
    """The commands parse their arguments before anything heavy loads (one commented lazy import each): ``--help``
    answers at once, and importing a command module imports neither torch nor Ray."""
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    commands = ("train", "tune", "evaluate", "explain", "export", "train_local")
    code = (
        "import sys\n"
        f"for name in {commands!r}:\n"
        "    __import__('megl_ray.' + name)\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'deepspeed', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in commands:
        proc = subprocess.run(
            [sys.executable, "-m", f"megl_ray.{name}", "--help"], capture_output=True, text=True, timeout=120, env=env
        )
        assert proc.returncode == 0 and "usage: python -m megl_ray." in proc.stdout, (name, proc.stderr[-2000:])


def test_a_config_error_in_train_answers_before_torch_or_ray_load():
    """``train``'s configuration is checked before its lazy import of the driver (Ray, torch, DeepSpeed: ~8 s on
    2 cores): a mistyped key is one line at once, and nothing heavy was imported for it."""
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    code = (
        "import sys\n"
        "from megl_ray import train\n"
        "from megl_ray.cli import run_cli\n"
        "assert run_cli('megl_ray.train', train.main, ['run.dir=x']) == 2\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'deepspeed', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "unknown config key 'run.dir'" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_the_megl_script_lists_and_runs_every_command():
    """``megl`` (the console script the package installs) lists the commands, runs one with its own arguments
    (``train --print-config``: no Ray, no torch), lists and copies presets, and refuses an unknown command in one
    line."""
    script = Path(sys.executable).parent / "megl"
    assert script.is_file(), "pip install -e . installs the megl console script"
    listed = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and all(f"  {c} " in listed.stdout for c in ("train", "tune", "convert", "configs"))
    proc = subprocess.run(
        [str(script), "train", "--config", "tiny", "--print-config", "train.epochs=3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["train"]["epochs"] == 3
    presets = subprocess.run([str(script), "configs"], capture_output=True, text=True, timeout=60)
    assert "tiny" in json.loads(presets.stdout.strip().splitlines()[-1])["presets"]
    unknown = subprocess.run([str(script), "trian"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and len(unknown.stderr.strip().splitlines()) == 1 and "trian" in unknown.stderr
