"""Search spaces of ``python -m megl_ray.tune``: every shipped file loads, bad ones fail naming the file and key."""

from pathlib import Path

import pytest
from ray import tune

from megl_ray.config import MEGLConfig, load_config
from megl_ray.tuning.space import SpaceError, apply_values, load_space, parse_space

REPO = Path(__file__).resolve().parents[2]
SPACES = sorted((REPO / "megl_ray" / "config" / "spaces").glob("*.yaml"))


def test_the_headline_spaces_are_shipped():
    names = {p.name for p in SPACES}
    assert {"loss_weights.yaml", "loss_weights_lr.yaml"} <= names
    assert load_space("loss_weights").keys == ["loss.text_weight", "loss.dc_weight"]
    assert "optim.lr" in load_space(REPO / "megl_ray" / "config" / "spaces" / "loss_weights_lr.yaml").keys


@pytest.mark.parametrize("path", SPACES, ids=[p.name for p in SPACES])
def test_every_space_file_loads_validates_and_samples(path):
    text = path.read_text()
    assert text.startswith("#") and "loguniform" in text.split("\n\n")[0], "the header documenting the form"
    base = load_config(REPO / "megl_ray" / "config" / "presets" / "tiny.yaml")
    space = load_space(path, base)
    assert space.params
    # Every sampled configuration is a valid config.
    from ray.tune.search.variant_generator import generate_variants

    for _, resolved in list(generate_variants(space.param_space()))[:8]:
        values = space.values(resolved)
        cfg = apply_values(base.to_dict(), values)
        for key, value in values.items():
            section, name = key.split(".")
            assert getattr(getattr(cfg, section), name) == value


def test_the_distributions_become_ray_tune_domains():
    space = parse_space(
        {
            "loss.text_weight": {"loguniform": [0.01, 1.0]},
            "loss.dc_weight": {"uniform": [0, 1]},
            "loss.visual_weight": {"choice": [0.5, 1, 2]},
            "optim.lr": {"grid": ["1e-4", 3e-4]},  # YAML 1.1 reads 1e-4 as a string: taken as the number
            "data.batch_size": {"randint": [8, 33]},
            "loss.visual_transform": {"grid": ["none", "gradia"]},
        },
        "s.yaml",
    )
    p = space.param_space()
    assert isinstance(p["loss"]["text_weight"], tune.search.sample.Float)
    assert p["loss"]["text_weight"].lower == 0.01 and isinstance(
        p["loss"]["text_weight"].sampler, tune.search.sample.LogUniform
    )
    assert isinstance(p["loss"]["dc_weight"].sampler, tune.search.sample.Uniform)
    assert p["loss"]["visual_weight"].categories == [0.5, 1.0, 2.0]
    assert p["optim"]["lr"] == {"grid_search": [1e-4, 3e-4]}
    assert isinstance(p["data"]["batch_size"], tune.search.sample.Integer)
    assert space.grid_size() == 4 and not space.only_grid()


def test_the_yaml_file_form(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("# comment\nloss.text_weight: {loguniform: [0.01, 1.0]}\noptim.lr: {grid: [1e-4, 3e-4]}\n")
    space = load_space(path)
    assert space.to_dict() == {"loss.text_weight": {"loguniform": [0.01, 1.0]}, "optim.lr": {"grid": [1e-4, 3e-4]}}
    assert space.values({"loss": {"text_weight": 0.5}, "optim": {"lr": 1e-4}}) == {
        "loss.text_weight": 0.5,
        "optim.lr": 1e-4,
    }


@pytest.mark.parametrize(
    "spec, fragment",
    [
        (
            {"loss.txt_weight": {"uniform": [0, 1]}},
            "loss.txt_weight: unknown config key (did you mean 'loss.text_weight'?)",
        ),
        ({"nonsense": {"uniform": [0, 1]}}, "nonsense: unknown config key"),
        ({"loss": {"uniform": [0, 1]}}, "loss: is a config section"),
        ({"loss.text_weight": {"normal": [0, 1]}}, "loss.text_weight: unknown distribution 'normal'"),
        ({"loss.text_weight": {"uniform": [1, 0.5]}}, "loss.text_weight: uniform needs low < high"),
        ({"loss.text_weight": {"uniform": [1, 1]}}, "uniform needs low < high"),
        ({"loss.text_weight": {"loguniform": [0, 1]}}, "loss.text_weight: loguniform needs 0 < low"),
        ({"optim.lr": {"loguniform": [-1, 1]}}, "optim.lr: loguniform needs 0 < low"),
        ({"loss.text_weight": {"uniform": [0, 1, 2]}}, "uniform takes [low, high]"),
        ({"loss.text_weight": {"uniform": ["a", 1]}}, "uniform bounds must be numbers"),
        ({"loss.dc_weight": {"uniform": [-1, 1]}}, "loss.dc_weight: uniform value -1.0 is invalid: must be >= 0"),
        ({"optim.lr": {"grid": [0.001, 0]}}, "optim.lr: grid value 0.0 is invalid: must be > 0"),
        ({"train.seed": {"uniform": [0, 10]}}, "train.seed: uniform needs a float key, but it is an integer key"),
        ({"model.sdtg": {"uniform": [0, 1]}}, "model.sdtg: uniform needs a float key, but it is not numeric"),
        (
            {"model.classifier": {"randint": [0, 2]}},
            "model.classifier: randint needs a numeric key, but it is not numeric",
        ),
        ({"data.batch_size": {"randint": [8.5, 16]}}, "randint bounds must be integers"),
        ({"loss.visual_transform": {"choice": ["none", "blur"]}}, "choice value 'blur' does not fit: expected one of"),
        ({"optim.lr": {"choice": []}}, "choice takes a non-empty list"),
        ({"optim.lr": 0.001}, "optim.lr: expected one distribution as {name: args}"),
        ({"optim.lr": {"grid": [1], "choice": [2]}}, "expected one distribution"),
        ({"run.name": {"grid": ["a", "b"]}}, "run.name: cannot be swept"),
        ({"train.num_workers": {"grid": [1, 2]}}, "train.num_workers: cannot be swept"),
        ({"train.epochs": {"grid": [1, 2]}}, "train.epochs: cannot be swept"),
        ([], "expected a non-empty mapping"),
        ({}, "expected a non-empty mapping"),
    ],
)
def test_bad_spaces_name_the_file_and_the_key(spec, fragment):
    with pytest.raises(SpaceError) as err:
        parse_space(spec, "bad.yaml")
    assert str(err.value).startswith("bad.yaml: ") and fragment in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_values_are_checked_against_the_base_config():
    base = MEGLConfig()
    parse_space({"model.image_size": {"grid": [32, 64]}}, "s.yaml", base)
    with pytest.raises(SpaceError, match="model.image_size: grid value 8 is invalid: must be >= 16"):
        parse_space({"model.image_size": {"grid": [8, 64]}}, "s.yaml", base)


def test_bad_files(tmp_path):
    with pytest.raises(SpaceError, match="search space file not found"):
        load_space(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss.text_weight: {uniform: [0, 1]\n")
    with pytest.raises(SpaceError, match=r"bad\.yaml:\d+:\d+: invalid YAML"):
        load_space(bad)
