"""Config: YAML + overrides, typed, unknown keys and wrong types rejected with the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssltrain.config import ConfigError, config_diff, from_yaml_text, load_config, to_yaml

DEMO = Path(__file__).parent.parent / "configs" / "demo.yaml"


def test_every_shipped_config_loads() -> None:
    for path in sorted(DEMO.parent.glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.steps > 0 and cfg.data.train


def test_overrides_apply_with_types() -> None:
    cfg = load_config(DEMO, ["optim.lr=0.5", "data.batch_size=64", "method.projector=[8,8]", "augment.global_crops.scale=[0.5,1.0]"])
    assert cfg.optim.lr == 0.5 and cfg.data.batch_size == 64 and cfg.method.projector == [8, 8]
    assert cfg.augment.global_crops.scale == [0.5, 1.0]


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*Valid keys under 'optim': name, lr, weight_decay"):
        load_config(DEMO, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'stepz'.*top level: name, out_dir, seed, steps"):
        load_config(DEMO, ["stepz=3"])


def test_wrong_type_in_a_file_names_the_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  train: x\n  batch_size: lots\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: bad value for 'data.batch_size'"):
        load_config(bad)
    nested = tmp_path / "nested.yaml"
    nested.write_text("data:\n  train: x\naugment:\n  global_crops:\n    bogus: 1\n")
    with pytest.raises(ConfigError, match=r"'augment.global_crops.bogus'.*Valid keys under 'augment.global_crops': count, size"):
        load_config(nested)


def test_semantic_checks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'data.train' is required"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="choose one of lars, adamw"):
        load_config(DEMO, ["optim.name=sgd"])
    with pytest.raises(ConfigError, match="'steps' must be positive"):
        load_config(DEMO, ["steps=0"])
    with pytest.raises(ConfigError, match=r"augment.global_crops.scale.*low <= high"):
        load_config(DEMO, ["augment.global_crops.scale=[0.9,0.1]"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(DEMO, ["optim.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_round_trip() -> None:
    cfg = load_config(DEMO, ["seed=7"])
    assert from_yaml_text(to_yaml(cfg)) == cfg


def test_config_diff_names_changed_keys() -> None:
    a = load_config(DEMO)
    b = load_config(DEMO, ["steps=500", "augment.global_crops.scale=[0.5,1.0]"])
    assert config_diff(a, b) == ["steps: 250 -> 500", "augment.global_crops.scale: [0.3, 1.0] -> [0.5, 1.0]"]
    assert config_diff(a, a) == []
