"""SPICE (Anderson et al. 2016) through pycocoevalcap's ``spice-1.0.jar``, only where its Java dependencies are
already on the machine.

The jar parses captions into scene graphs with Stanford CoreNLP 3.6.0, whose two jars (~400 MB) pycocoevalcap
downloads from nlp.stanford.edu the first time ``Spice()`` is built. We never download at run time: SPICE is
computed when ``java`` is on PATH and ``stanford-corenlp-3.6.0.jar`` and ``stanford-corenlp-3.6.0-models.jar`` are
in pycocoevalcap's ``spice/lib`` folder, and is otherwise ``None`` with the reason (``spice_status``).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from pycocoevalcap.spice.spice import Spice

from megl_ray.evaluation.metrics import finite_float
from megl_ray.evaluation.text_metrics import coco_inputs

log = logging.getLogger("megl_ray.evaluation.spice")

CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def spice_dir() -> Path | None:
    try:
        # Lazy and guarded: SPICE is optional (its Java jars come with pycocoevalcap); without it the key is null.
        import pycocoevalcap.spice.spice as module  # noqa: PLC0415
    except ImportError:
        return None
    return Path(module.__file__).resolve().parent


def spice_status() -> str | None:
    """None when SPICE can run here; otherwise why not, in one sentence."""
    root = spice_dir()
    if root is None:
        return "pycocoevalcap is not installed"
    if shutil.which("java") is None:
        return "java is not on PATH (SPICE runs spice-1.0.jar)"
    missing = [jar for jar in CORENLP_JARS if not (root / "lib" / jar).is_file()]
    if missing:
        return (
            f"Stanford CoreNLP 3.6.0 is not installed for SPICE (missing {', '.join(missing)} in {root / 'lib'}; "
            f"from stanford-corenlp-full-2015-12-09.zip); it is never downloaded at run time"
        )
    if not os.access(root, os.W_OK):
        return f"{root} is not writable (SPICE keeps its temp files and parse cache there)"
    return None


def spice(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float | None, str | None]:
    """(corpus SPICE F-score, None), or (None, reason) when it cannot be computed here. Text goes in as
    ``metrics.coco_tokenize`` gives it, as for METEOR and CIDEr."""
    if not hypotheses:
        return None, "no hypotheses"
    reason = spice_status()
    if reason is not None:
        return None, reason

    gts, res = coco_inputs(hypotheses, references)
    scorer = Spice.__new__(Spice)  # skip __init__: it would download CoreNLP when the jars are missing
    try:
        score, _ = scorer.compute_score(gts, res)
    except (OSError, ValueError, subprocess.CalledProcessError) as err:
        log.warning("SPICE failed (%s): reported as null", err)
        return None, f"spice-1.0.jar failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    return finite_float(score), None
