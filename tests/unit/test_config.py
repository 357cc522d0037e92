import json
from pathlib import Path

import pytest
import yaml

from megl_ray.config import MEGLConfig, config_from_dict, load_config, packaged_config
from megl_ray.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "megl_ray" / "config" / "presets"


def test_defaults_are_valid_and_round_trip_through_yaml(tmp_path):
    cfg = load_config()
    assert isinstance(cfg, MEGLConfig)
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_packaged_config_loads(path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    # what the file says is what the config holds (no key silently ignored)
    for section, values in raw.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"


def test_overrides_parse_values_as_yaml():
    cfg = load_config(
        packaged_config("tiny"),
        [
            "loss.text_weight=0.5",
            "model.sdtg=false",
            "train.epochs=3",
            "model.lora_target_modules=[q_proj]",
            "run.name=abc",
        ],
    )
    assert cfg.loss.text_weight == 0.5 and cfg.model.sdtg is False and cfg.train.epochs == 3
    assert cfg.model.lora_target_modules == ["q_proj"] and cfg.run.name == "abc"
    assert isinstance(load_config(None, ["loss.dc_weight=1"]).loss.dc_weight, float)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.nonsense=1", "unknown config key 'model.nonsense'"),
        ("nonsense.key=1", "unknown config key 'nonsense'"),
        ("loss.text_weight=-1", "loss.text_weight: must be >= 0"),
        ("loss.visual_transform=blur", "loss.visual_transform: expected one of"),
        ("model.sdtg=maybe", "model.sdtg: expected true or false"),
        ("train.epochs=1.5", "train.epochs: expected an integer"),
        ("train.zero_stage=4", "train.zero_stage: must be 0, 1, 2 or 3"),
        ("model.preset=llava", "model.vlm_path: is required"),
        ("no_equals_sign", "not of the form key=value"),
        ("run.checkpoint_metric=val_f1", "run.checkpoint_metric: must be one of"),
        ("run.export_from=middle", "run.export_from: expected one of"),
        ("run.peak_tflops=0", "run.peak_tflops: must be > 0"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_file_gives_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  classifier: [tiny\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+:\d+: invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match="model: expected a mapping"):
        config_from_dict({"model": 3})


def test_rrr_option_is_refused_under_zero3_at_load_time():
    with pytest.raises(ConfigError, match="loss.rrr_weight: .*ZeRO-3"):
        load_config(None, ["loss.rrr_weight=10", "train.zero_stage=3"])
    assert load_config(None, ["loss.rrr_weight=10", "train.zero_stage=2"]).loss.rrr_weight == 10.0
    with pytest.raises(ConfigError, match="loss.rrr_weight"):
        load_config(None, ["loss.rrr_weight=-1"])


def test_a_packaged_preset_is_named_where_a_config_file_is_asked_for(tmp_path, monkeypatch):
    assert load_config("tiny") == load_config(packaged_config("tiny"))
    assert load_config("r18-qwen2-0.5b").model.preset == "clip-qwen2"
    with pytest.raises(ConfigError, match=r"config file not found: tinny \(nor a packaged preset: .*tiny"):
        load_config("tinny")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text("train:\n  epochs: 7\n")  # a file that exists wins over the preset's name
    assert load_config("tiny").train.epochs == 7


def test_train_print_config_prints_every_resolved_key_and_starts_nothing(capsys):
    from megl_ray import train
    from megl_ray.cli import run_cli

    assert run_cli("megl_ray.train", train.main, ["--config", "tiny", "--print-config", "train.epochs=3"]) == 0
    out, err = capsys.readouterr()
    printed = json.loads(out.strip().splitlines()[-1])
    expected = load_config("tiny", ["train.epochs=3"])
    assert printed == expected.to_dict() == yaml.safe_load(err) and printed["train"]["epochs"] == 3
    assert config_from_dict(printed) == expected  # the JSON line is a config file again


def test_megl_configs_lists_shows_and_copies_the_presets(tmp_path, capsys):
    from megl_ray.megl import configs_main, main

    assert "tiny" in configs_main([])["presets"]
    shown = configs_main(["tiny"])
    assert yaml.safe_load(capsys.readouterr().err) == yaml.safe_load(packaged_config("tiny").read_text())
    assert shown["path"] == str(packaged_config("tiny"))
    copied = configs_main(["r18-qwen2-0.5b", "--copy", str(tmp_path / "mine.yaml")])
    assert load_config(copied["copied_to"]) == load_config("r18-qwen2-0.5b")
    assert main(["configs", "nope"]) == 2 and "no packaged config named 'nope'" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "train-local" in capsys.readouterr().out


def test_the_checkpoint_order_is_inferred_from_the_metric_unless_given():
    assert load_config(None, ["run.checkpoint_metric=val_accuracy"]).checkpoint_order() == "max"
    assert load_config(None, ["run.checkpoint_metric=val_miou"]).checkpoint_order() == "max"
    assert load_config(None, ["run.checkpoint_metric=loss"]).checkpoint_order() == "min"
    chosen = ["run.checkpoint_metric=val_accuracy", "run.checkpoint_mode=min"]
    assert load_config(None, chosen).checkpoint_order() == "min"


def test_every_config_key_has_a_docstring_and_help_lists_them_without_markup(capsys):
    """``train --help`` lists every key (what --print-config prints) with its default and its docstring's first
    sentence; docstrings' RST literals are plain text there."""
    from megl_ray import train
    from megl_ray.config.reference import config_keys

    keys = {key: doc for key, _, doc in config_keys()}
    flat = {f"{section}.{key}" for section, values in load_config(None).to_dict().items() for key in values}
    assert set(keys) == flat and len(flat) > 70
    assert all(doc for doc in keys.values()), [k for k, doc in keys.items() if not doc]
    with pytest.raises(SystemExit) as done:
        train.build_parser().parse_args(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for key in flat:
        assert f"  {key} (" in text, key
    assert "``" not in text and "  train.grad_accum (1)  Gradient-accumulation steps" in text
    assert "  run.checkpoint_metric (null)  Keep the best checkpoint by this reported metric" in text
