"""``megl_ray.config.strict_yaml``: duplicate keys, alias bombs and deep nesting are one-line errors."""

import pytest

from megl_ray.config.strict_yaml import parse_yaml
from megl_ray.errors import ConfigError


def test_strict_yaml():
    assert parse_yaml("a: 1\nb: {c: [1, 2]}\nbase: &x {k: 1}\nuse: *x\n", "t") == {
        "a": 1,
        "b": {"c": [1, 2]},
        "base": {"k": 1},
        "use": {"k": 1},
    }
    assert parse_yaml("base: &b {x: 1}\nother:\n  <<: *b\n  x: 2\n", "t")["other"] == {"x": 2}  # merge keys still work
    with pytest.raises(ConfigError, match=r"t:3:1: invalid YAML \(duplicate key 'a'\)"):
        parse_yaml("a: 1\nb: 2\na: 3\n", "t")
    with pytest.raises(ConfigError, match="duplicate key"):
        parse_yaml("x: {k: 1, k: 2}\n", "t")
    bomb = "a: &a [1, 1, 1, 1]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefghi", "bcdefghij")
    )
    with pytest.raises(ConfigError, match="aliases"):
        parse_yaml(bomb, "t")
    with pytest.raises(ConfigError, match="invalid YAML"):
        parse_yaml("[" * 50_000 + "]" * 50_000, "t")
