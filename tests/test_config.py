"""Config: YAML + overrides, typed, unknown keys and wrong types rejected with the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssltrain.config import (
    ConfigError,
    check_same_model,
    check_world_size,
    config_diff,
    config_warnings,
    from_yaml_text,
    load_config,
    to_yaml,
)

DEMO = Path(__file__).parent.parent / "configs" / "demo.yaml"


def test_every_shipped_config_loads() -> None:
    for path in sorted(DEMO.parent.glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.steps > 0 and cfg.data.train


def test_overrides_apply_with_types() -> None:
    cfg = load_config(
        DEMO, ["optim.lr=0.5", "data.batch_size=64", "method.projector=[8,8]", "augment.global_crops.scale=[0.5,1.0]"]
    )
    assert cfg.optim.lr == 0.5 and cfg.data.batch_size == 64 and cfg.method.projector == [8, 8]
    assert cfg.augment.global_crops.scale == [0.5, 1.0]


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown config key 'optim.lrr'.*Valid keys under 'optim': name, lr, weight_decay"
    ):
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
    with pytest.raises(
        ConfigError, match=r"'augment.global_crops.bogus'.*Valid keys under 'augment.global_crops': count, size"
    ):
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
    assert config_diff(a, b) == [f"steps: {a.steps} -> 500", "augment.global_crops.scale: [0.3, 1.0] -> [0.5, 1.0]"]
    assert config_diff(a, a) == []


def test_malformed_yaml_names_the_file_the_line_and_the_fix(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata:\n  train: 'shards\n  batch_size: 8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml' is not valid YAML at line \d+.*quoted scalar at line 3.*fix"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="not a mapping"):
        load_config(listed)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_batch_must_split_over_the_ranks_and_micro_batches() -> None:
    check_world_size(load_config(DEMO, ["data.batch_size=16"]), 4)
    with pytest.raises(ConfigError, match=r"15 samples per micro-batch is not divisible by the 2 ranks.*e\.g\. 14"):
        check_world_size(load_config(DEMO, ["data.batch_size=15"]), 2)
    with pytest.raises(ConfigError, match=r"multiple of 8"):  # 4 ranks x 2 micro-batches
        check_world_size(load_config(DEMO, ["data.batch_size=12", "optim.accumulate=2"]), 4)


def test_backbone_options_are_checked_at_load_time() -> None:
    vit = ["model.backbone=vit_tiny", "augment.global_crops.size=32", "model.patch_size=16"]
    load_config(DEMO, vit)
    for extra, message in (
        (["model.small_stem=true"], "model.small_stem applies to ResNets only"),
        (["model.patch_size=12"], r"global_crops.size 32 is not a multiple of model.patch_size 12"),
        (["augment.local_crops.count=2", "augment.local_crops.size=24"], r"local_crops.size 24 is not a multiple"),
        (["model.drop_path=1.0"], r"drop_path must be in \[0, 1\)"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(DEMO, vit + extra)
    with pytest.raises(ConfigError, match="drop_path applies to ViTs only"):
        load_config(DEMO, ["model.backbone=resnet18", "model.drop_path=0.1"])
    with pytest.raises(ConfigError, match="r3d_18 takes video clips; set data.modality=video"):
        load_config(DEMO, ["model.backbone=r3d_18"])


def test_warmup_longer_than_the_run_is_a_warning() -> None:
    assert config_warnings(load_config(DEMO, ["steps=100", "optim.warmup_steps=10"])) == []
    (warning,) = config_warnings(load_config(DEMO, ["steps=5", "optim.warmup_steps=10"]))
    assert "optim.warmup_steps 10 is longer than steps 5" in warning and "never reaches optim.lr" in warning


def test_same_model_check_names_what_changed() -> None:
    old = load_config(DEMO)
    assert check_same_model(old, load_config(DEMO, ["steps=999", "optim.lr=0.5"])) is None
    problem = check_same_model(old, load_config(DEMO, ["method.name=simclr", "model.backbone=resnet50"]))
    assert problem is not None and "another model (method.name 'vicreg' -> 'simclr', model.backbone" in problem
    assert "'resnet18' -> 'resnet50'" in problem and "start a new run under another name (name=NEW)" in problem
