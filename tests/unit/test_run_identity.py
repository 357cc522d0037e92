"""Run identity: what may change on resume, what a changed key says, when a run name is chosen."""

import pytest

from megl_ray.config import load_config, packaged_config
from megl_ray.driver import run_identity
from megl_ray.driver.run_identity import check_run, differing_keys, fingerprint, fresh_name, name_given
from megl_ray.errors import UserError


def _cfg(*overrides):
    return load_config(packaged_config("tiny"), list(overrides))


def test_the_fingerprint_ignores_resumable_keys_and_names_the_others():
    base = fingerprint(_cfg())
    assert fingerprint(_cfg("train.max_failures=5", "run.log_every=1", "run.name=x")) == base
    assert differing_keys(base, fingerprint(_cfg("loss.text_weight=0.5", "train.epochs=3"))) == [
        "loss.text_weight",
        "train.epochs",
    ]


def test_a_run_is_new_resumed_complete_or_refused(tmp_path, capsys):
    run = str(tmp_path / "r")
    cfg = _cfg("run.name=r")
    assert check_run(cfg, run) is None and (tmp_path / "r" / run_identity.IDENTITY_FILE).is_file()  # new
    assert check_run(_cfg("run.name=r", "train.max_failures=9"), run) is None  # resumed
    (tmp_path / "r" / run_identity.RESULT_FILE).write_text('{"steps": 3}')
    assert check_run(cfg, run) == {"steps": 3}
    # the one line it prints (log lines of other modules may share stderr, depending on the logging set-up)
    assert f"run r is complete: {run}" in capsys.readouterr().err.splitlines()
    with pytest.raises(UserError, match=r"\(loss.text_weight differs\).*run.name=<new name>"):
        check_run(_cfg("run.name=r", "loss.text_weight=0.5"), run)


def test_a_name_is_chosen_by_an_override_or_the_yaml_and_fresh_names_differ(tmp_path):
    named = tmp_path / "named.yaml"
    named.write_text("run:\n  name: mine\n")
    assert name_given(None, ["run.name=x"]) and name_given(str(named), [])
    assert not name_given(None, ["train.epochs=1"]) and not name_given(packaged_config("tiny"), [])
    assert fresh_name("megl") != fresh_name("megl") and fresh_name("megl").startswith("megl-")
