"""``megl COMMAND [ARGS]``: every megl_ray command behind one name (the ``megl`` console script; also
``python -m megl_ray.megl``). ``python -m megl_ray.<command>`` keeps working: each command is the same ``main``.

    megl train --config tiny train.epochs=3       megl configs                 (the packaged presets)
    megl tune --space SPACE ...                   megl configs tiny --copy my.yaml
    megl evaluate --checkpoint EXPORT --data DATA megl convert SRC DST
"""

from __future__ import annotations

import importlib
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megl_ray.cli import ArgumentParser, run_cli, setup_logging
from megl_ray.config import packaged_config, preset_names

COMMANDS = {
    "train": ("megl_ray.train", "train on Ray (Ray Train + DeepSpeed; the embedded default without arguments)"),
    "tune": ("megl_ray.tune", "sweep loss weights and learning rates with Ray Tune"),
    "evaluate": ("megl_ray.evaluate", "score an export on a split (accuracy, mIoU, BLEU-4, ...)"),
    "explain": ("megl_ray.explain", "saliency overlays and rationales for images, or a gallery"),
    "export": ("megl_ray.export", "merge an export (--merge) or export a training checkpoint (--from-checkpoint)"),
    "train-local": ("megl_ray.train_local", "train in this process, without Ray"),
    "convert": ("megl_ray.data.convert", "convert a dataset (authors' layout, manifests, HF, WebDataset) to shards"),
    "make-sample": ("megl_ray.data.make_sample", "build the bundled sample dataset"),
    "make-animals": ("megl_ray.data.make_animals", "build the animal-silhouette benchmark (shortcut: a frame)"),
    "storage": ("megl_ray.storage.serve", "serve the embedded S3 store, or show and clear the model cache"),
}


def usage() -> str:
    width = max(map(len, [*COMMANDS, "configs"]))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines.append(f"  {'configs':<{width}}  list the packaged presets (--config NAME), or copy one out")
    return "usage: megl COMMAND [ARGS]   (megl COMMAND --help for its own)\n\ncommands:\n" + "\n".join(lines)


def configs_main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = ArgumentParser(prog="megl configs", description="The packaged presets, usable as --config NAME.")
    p.add_argument("name", nargs="?", help="a preset: print its path, or copy it with --copy")
    p.add_argument("--copy", metavar="DST", help="copy the preset to DST (a file to edit and pass as --config)")
    args = p.parse_args(argv)
    if args.name is None:
        return {"presets": preset_names()}
    path = packaged_config(args.name)
    if args.copy:
        shutil.copyfile(path, args.copy)
        return {"preset": args.name, "copied_to": str(Path(args.copy).resolve())}
    print(path.read_text(), file=sys.stderr, end="")
    return {"preset": args.name, "path": str(path)}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "configs":
        return run_cli("megl configs", configs_main, rest)
    if name not in COMMANDS:
        print(f"megl: unknown command '{name}' (one of {', '.join([*COMMANDS, 'configs'])})", file=sys.stderr)
        return 2
    # By name: only the command asked for is imported (each keeps its own lazy import of torch and Ray).
    command = importlib.import_module(COMMANDS[name][0])
    return run_cli(f"megl {name}", command.main, rest)


def run() -> None:
    """The ``megl`` console script."""
    setup_logging(verbose=False)  # each command configures its console once its flags are parsed
    sys.exit(main())


if __name__ == "__main__":
    run()
