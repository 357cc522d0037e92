"""Credentials reach workers from their environment or a 0600 file, never from what Ray stores."""

import os
import stat

from megl_ray.cluster.credentials import OUTER_FILE_VAR, credentials_file, load_credentials, public_env


def test_forwarded_settings_carry_no_credentials():
    env = {
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_ACCESS_KEY_ID": "a",
        "AWS_SESSION_TOKEN": "t",
        "MEGL_S3_SECRET_KEY": "m",
        "MEGL_S3_ENDPOINT": "http://127.0.0.1:1",
        "AWS_REGION": "r",
        "HOME": "/root",
    }
    assert public_env(env) == {"MEGL_S3_ENDPOINT": "http://127.0.0.1:1", "AWS_REGION": "r"}


def test_the_credentials_file_is_private_temporary_and_fills_in_only_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.delenv(OUTER_FILE_VAR, raising=False)  # load_credentials sets it: restored after the test
    monkeypatch.setenv("MEGL_HOME", str(tmp_path))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    with credentials_file() as path:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and str(tmp_path) in path
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "own")
        load_credentials(path)
        assert os.environ["AWS_SECRET_ACCESS_KEY"] == "s3cr3t" and os.environ["AWS_ACCESS_KEY_ID"] == "own"
        # a run started in this process (a sweep's trial) reuses the loaded file and leaves it to its owner: a trial
        # the scheduler stops is ended at once and could not remove a file of its own
        with credentials_file() as nested:
            assert nested == path
        assert os.path.exists(path) and len(list((tmp_path / "credentials").iterdir())) == 1
    assert not os.path.exists(path)


def test_tune_trials_get_no_credentials_in_their_runtime_env(monkeypatch):
    from ray.tune.execution import class_cache

    from megl_ray.cluster.credentials import INHERIT_VAR, keep_tune_from_logging_credentials

    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE", set(class_cache.ENV_VARS_TO_PROPAGATE))
    monkeypatch.setenv(INHERIT_VAR, "1")
    keep_tune_from_logging_credentials()
    assert "AWS_SECRET_ACCESS_KEY" not in class_cache.ENV_VARS_TO_PROPAGATE
    assert class_cache.ENV_VARS_TO_PROPAGATE  # Ray Train's own variables still propagate
