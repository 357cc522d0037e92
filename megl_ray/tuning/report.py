"""What a sweep leaves: one row per trial, the results table on stderr, ``results.csv``/``results.json`` and the
best trial's config as YAML beside the experiment (and on this machine, for ``python -m megl_ray.train --config``)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from megl_ray import storage
from megl_ray.config import MEGLConfig, megl_home
from megl_ray.errors import UserError
from megl_ray.storage.uri import run_uri
from megl_ray.tuning.settings import SweepSettings
from megl_ray.tuning.space import apply_values

log = logging.getLogger("megl_ray.tune")


def _status(trial_status: str, epochs: int | None, planned: int) -> str:
    if trial_status == "TERMINATED":
        return "completed" if (epochs or 0) >= planned else "early-stopped"
    if trial_status == "ERROR":
        return "error"
    return trial_status.lower()  # pending, running, paused: the sweep was interrupted


def _number(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) or math.isinf(value) else value


def trial_rows(grid: Any, settings: SweepSettings, resolved: MEGLConfig) -> list[dict[str, Any]]:
    """One row per trial: id, the swept values, the last reported metric, epochs run, status, run directory."""
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None)  # with their status
    if trials is None:  # not expected: the public results lack the status of unfinished trials
        trials = [
            SimpleNamespace(
                trial_id=r.metrics.get("trial_id") or Path(r.path).name,
                config=r.config or {},
                status="ERROR" if r.error else "TERMINATED",
                last_result=r.metrics or {},
            )
            for r in grid
        ]
    rows = []
    for trial in sorted(trials, key=lambda t: t.trial_id):
        result = trial.last_result or {}
        epochs = result.get("epoch")
        rows.append(
            {
                "trial": trial.trial_id,
                **settings.space.values(trial.config),
                settings.metric: _number(result.get(settings.metric)),
                "epochs": int(epochs) if epochs is not None else 0,
                "status": _status(trial.status, epochs, resolved.train.epochs),
                "run": run_uri(resolved.run.storage_path, f"{settings.name}-{trial.trial_id}"),
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else str(value)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def report(
    rows: list[dict[str, Any]], settings: SweepSettings, experiment_uri: str, resumed: bool, started: float
) -> dict[str, Any]:
    columns = ["trial", *settings.space.keys, settings.metric, "epochs", "status"]
    sign = 1 if settings.mode == "max" else -1
    scored = [r for r in rows if r[settings.metric] is not None and r["status"] != "error"]
    best = max(scored, key=lambda r: sign * r[settings.metric]) if scored else None
    print(
        f"\nsweep {settings.name}: {len(rows)} trial(s), {settings.metric} ({settings.mode})"
        + (f", best {best['trial']}" if best else "")
        + "\n"
        + format_table(rows, columns),
        file=sys.stderr,
        flush=True,
    )

    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "early-stopped", "error")}
    # Trials not finished, and those an interrupted sweep had not created yet.
    unfinished = max(len(rows), settings.num_samples * settings.space.grid_size()) - sum(counts.values())
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*columns, "run"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    results_csv = experiment_uri + "/results.csv"
    results_json = experiment_uri + "/results.json"
    storage.write_bytes(results_csv, buffer.getvalue().encode())
    best_config = best_config_uri = None
    if best is not None:
        cfg = apply_values(settings.base.to_dict(), {k: best[k] for k in settings.space.keys})
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=f"{settings.name}-best"))
        best_config_uri = experiment_uri + "/best_config.yaml"
        text = (
            f"# The best trial ({best['trial']}, {settings.metric}={best[settings.metric]:.4g}, {settings.mode}) "
            f"of sweep {settings.name}; its run: {best['run']}\n"
            f"# Train it again, as run {cfg.run.name}: python -m megl_ray.train --config best_config.yaml\n"
            + cfg.to_yaml()
        )
        storage.write_bytes(best_config_uri, text.encode())
        best_config = best_config_uri
        if storage.is_s3(best_config_uri):  # --config takes a local file: keep a copy on this machine too
            best_config = str(megl_home() / "sweeps" / settings.name / "best_config.yaml")
            storage.write_bytes(best_config, text.encode())
    summary = {
        "name": settings.name,
        "experiment": experiment_uri,
        "metric": settings.metric,
        "mode": settings.mode,
        "trials": len(rows),
        "completed": counts["completed"],
        "early_stopped": counts["early-stopped"],
        "errored": counts["error"],
        "unfinished": unfinished,
        "resumed": resumed,
        "best_trial": best["trial"] if best else None,
        "best_metric": best[settings.metric] if best else None,
        "best_values": {k: best[k] for k in settings.space.keys} if best else None,
        "best_run": best["run"] if best else None,
        "best_config": best_config,
        "best_config_uri": best_config_uri,
        "results_csv": results_csv,
        "results_json": results_json,
        "seconds": round(time.monotonic() - started, 1),
    }
    storage.write_bytes(results_json, (json.dumps({**summary, "rows": rows}, indent=2) + "\n").encode())
    if unfinished:
        log.warning(
            "sweep %s was interrupted with %d trial(s) unfinished: re-run the same command to resume it",
            settings.name,
            unfinished,
        )
        raise KeyboardInterrupt
    if best is None:
        raise UserError(
            f"sweep {settings.name}: no trial reported {settings.metric} ({counts['error']} failed; see {results_csv})"
        )
    return summary
