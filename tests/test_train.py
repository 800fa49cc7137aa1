"""End-to-end training: exact resume, crash safety, logs, bad input reaching the trainer."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_same_params, final_params, make_shards, start_training, tiny_config

from ssltrain.config import Config, ConfigError, to_yaml
from ssltrain.core.checkpoint_layout import CheckpointError
from ssltrain.core.checkpoints import load_checkpoint
from ssltrain.engine.checkpoint import Checkpointer
from ssltrain.engine.loop import train
from ssltrain.eval.metrics_log import read_metrics


def test_stopped_and_resumed_run_equals_uninterrupted_run(shard_dir: Path, tmp_path: Path) -> None:
    whole = train(tiny_config(tmp_path / "a", str(shard_dir), **{"data.workers": 2}))
    cfg = tiny_config(tmp_path / "b", str(shard_dir), **{"data.workers": 2})
    train(cfg, stop_after_steps=3)  # stops mid-epoch (6 batches an epoch), checkpointing step 3 first
    assert Checkpointer(cfg.run_dir / "checkpoints").latest().name == "step-3"
    resumed = train(cfg)
    assert_same_params(final_params(whole), final_params(resumed))
    steps = [r["step"] for r in read_metrics(resumed / "metrics.jsonl")]
    assert steps == list(range(1, 7))  # no record twice, none missing
    # optimizer state and schedule position match too
    parts = ("model", "optim")
    sa, sb = (
        load_checkpoint(whole / "checkpoints/step-6", parts),
        load_checkpoint(resumed / "checkpoints/step-6", parts),
    )
    assert sa["data_position"] == sb["data_position"] == 6 * 8
    assert sa["optim"].keys() == sb["optim"].keys() and sa["optim"]
    for name in sa["optim"]:
        assert all(torch.equal(sa["optim"][name][k], sb["optim"][name][k]) for k in sa["optim"][name])


def _start_run(tmp_path: Path, overrides: dict) -> tuple[subprocess.Popen, Config]:
    data = tmp_path / "data"
    data.mkdir()
    make_shards(data, [64, 64])
    cfg = tiny_config(tmp_path, str(data), **overrides)
    return start_training(cfg, tmp_path / "tiny.yaml"), cfg


def _resume_equals_uninterrupted(tmp_path: Path, cfg: Config, overrides: dict) -> None:
    resumed = train(cfg)
    uninterrupted = train(tiny_config(tmp_path / "ref", cfg.data.train, **overrides))
    assert_same_params(final_params(resumed), final_params(uninterrupted))
    ckpts = cfg.run_dir / "checkpoints"
    assert all((path / "COMPLETE").is_file() for path in ckpts.iterdir())  # the incomplete ones were removed


def test_kill_minus_nine_at_any_moment_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    overrides = {"steps": 14, "checkpoint.every": 2, "checkpoint.keep": 2}
    proc, cfg = _start_run(tmp_path, overrides)
    ckpts = cfg.run_dir / "checkpoints"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (ckpts / "step-4/COMPLETE").exists() and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.3)  # land somewhere inside a later step or checkpoint write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; the test proved nothing"
    latest = Checkpointer(ckpts).latest()
    assert latest is not None and int(latest.name.split("-")[1]) >= 4
    load_checkpoint(latest)  # complete and loadable
    _resume_equals_uninterrupted(tmp_path, cfg, overrides)


def test_kill_minus_nine_during_a_checkpoint_write(tmp_path: Path) -> None:
    """Killed while step 4's files are being written (directory there, marker not): step 2 is the latest."""
    overrides = {"steps": 8, "checkpoint.every": 2, "checkpoint.keep": 5}
    proc, cfg = _start_run(tmp_path, overrides)
    step4 = cfg.run_dir / "checkpoints/step-4"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not step4.exists() and proc.poll() is None:
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert step4.exists() and not (step4 / "COMPLETE").exists(), "not killed mid-write; the test proved nothing"
    assert Checkpointer(cfg.run_dir / "checkpoints").latest().name == "step-2"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(step4)
    _resume_equals_uninterrupted(tmp_path, cfg, overrides)


def test_resuming_on_changed_data_or_config_says_so(
    shard_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_config(tmp_path, str(shard_dir), steps=2)
    train(cfg)
    make_shards(shard_dir, [9], prefix="extra")  # a shard added between save and resume
    cfg.data.train = f"{shard_dir}/*.tar"
    cfg.steps = 3
    with caplog.at_level("WARNING", logger="ssltrain"):
        train(cfg)
    assert "the data changed" in caplog.text and "(53 -> 62 samples)" in caplog.text
    assert "steps: 2 -> 3" in caplog.text


def test_corrupt_latest_checkpoint_is_an_error_not_a_restart(shard_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, str(shard_dir), steps=2)
    train(cfg)
    (data_file,) = (cfg.run_dir / "checkpoints/step-2").glob("*.distcp")
    data_file.write_bytes(data_file.read_bytes()[:100])
    cfg.steps = 4
    with pytest.raises(CheckpointError, match="step-2"):
        train(cfg)


@pytest.mark.parametrize(
    "method,terms", [("vicreg", ("invariance", "variance", "covariance")), ("simclr", ("accuracy",))]
)
def test_metrics_and_tensorboard_are_written(
    shard_dir: Path, tmp_path: Path, method: str, terms: tuple[str, ...]
) -> None:
    run = train(tiny_config(tmp_path, str(shard_dir), steps=3, **{"method.name": method}))
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("loss", "lr", "img_per_s", "epoch", "data_skipped") + terms:
        assert key in records[-1]
    assert records[0]["lr"] < records[1]["lr"]  # warm-up
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "config.yaml").read_text().startswith("name: tiny")


def test_training_skips_and_counts_corrupt_samples(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (tar,) = make_shards(data, [24])
    # overwrite the image bytes of two samples in place: the index stays valid, the PNGs do not decode
    from ssltrain.data.shards import read_index

    index = read_index(tar)
    with open(tar, "r+b") as f:
        for i in (3, 17):
            comp = index.samples[i].components["png"]
            f.seek(comp.offset)
            f.write(b"\0" * comp.size)
    run = train(tiny_config(tmp_path, str(data), steps=3, **{"data.workers": 1}))
    records = read_metrics(run / "metrics.jsonl")
    assert records[-1]["data_skipped"] == 2  # 3 steps x 8 = every one of the 24 samples seen once


def test_online_linear_probe_learns_on_detached_features(tmp_path: Path) -> None:
    """The probe (a monitor with its own optimizer) is trained: its weights move between checkpoints and its terms
    are logged; its classes are read from the labels and saved; it sends no gradient into the backbone."""
    from ssltrain.config import from_yaml_text
    from ssltrain.data.augment import CPURenderer
    from ssltrain.data.loaders.cpu import AugmentedShards, collate_views
    from ssltrain.data.stream import ShardCatalog
    from ssltrain.methods import build_method
    from ssltrain.monitors import MonitorContext, StepOutputs
    from ssltrain.monitors.online_linear import OnlineLinear

    data = tmp_path / "data"
    data.mkdir()
    make_shards(data, [40])  # labels i % 5
    cfg = tiny_config(
        tmp_path, str(data), steps=2, **{"eval.online_linear": True, "data.batch_size": 20, "checkpoint.every": 1}
    )
    run = train(cfg)
    records = read_metrics(run / "metrics.jsonl")
    assert "online_linear_top1" in records[-1] and "online_linear_loss" in records[-1]
    assert "online_linear_classes: 5" in (run / "config.yaml").read_text()
    weights = [
        torch.load(run / f"checkpoints/step-{s}/monitors.pt", weights_only=True)["online_linear"]["linear"]["weight"]
        for s in (1, 2)
    ]
    assert weights[1].shape[0] == 5
    assert not torch.equal(weights[0], weights[1])  # its optimizer trains it
    # no gradient into the backbone, even from features that were not detached
    run_cfg = from_yaml_text((run / "config.yaml").read_text())
    model = build_method(run_cfg)
    dataset = AugmentedShards(ShardCatalog.from_spec(str(data)), CPURenderer(run_cfg.augment), 0)
    views = collate_views([dataset[(i, i)] for i in range(8)])
    features = model.features(views.global_views[0])
    assert features.requires_grad
    probe = OnlineLinear.build(MonitorContext(run_cfg, torch.device("cpu"), model, model, True, 0))
    figures = probe.on_step(StepOutputs(1, {}, None, features, views.label, True, 1e-3, 1.0))
    assert all(p.grad is None for p in model.parameters())
    assert figures["online_linear_loss"] > 0 and 0.0 <= figures["online_linear_top1"] <= 1.0


def test_tensorboard_can_be_turned_off(shard_dir: Path, tmp_path: Path) -> None:
    run = train(tiny_config(tmp_path, str(shard_dir), steps=1, threads=1, **{"log.tensorboard": False}))
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1] and not (run / "tb").exists()


def test_records_carry_gradient_and_weight_norms_and_the_run_time(shard_dir: Path, tmp_path: Path) -> None:
    """grad_norm (before clipping), weight_norm and time_s, which a resumed run continues rather than restarts."""
    cfg = tiny_config(tmp_path, str(shard_dir), steps=4, **{"optim.grad_clip": 1e-3})
    train(cfg, stop_after_steps=2)
    first = read_metrics(cfg.run_dir / "metrics.jsonl")
    train(cfg)
    records = read_metrics(cfg.run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["grad_norm"] > 1e-3 for r in records)  # the norm before clipping, not the clipped one
    model = final_params(cfg.run_dir)
    expected = torch.sqrt(
        sum(
            v.double().square().sum()
            for k, v in model.items()
            if "running" not in k and "num_batches" not in k and "teacher" not in k
        )
    )
    assert records[-1]["weight_norm"] == pytest.approx(float(expected), rel=1e-5)
    times = [r["time_s"] for r in records]
    assert times == sorted(times) and times[2] > first[-1]["time_s"]  # carried over the restart


def test_redirected_output_has_a_line_per_log_step_and_no_bar_frames(shard_dir: Path, tmp_path: Path) -> None:
    """A Slurm job's log is a file: tqdm's carriage-return frames would fill it; one line per log step instead."""
    config = tmp_path / "tiny.yaml"
    config.write_text(to_yaml(tiny_config(tmp_path, str(shard_dir), steps=4, log_every=2, progress=True)))
    done = subprocess.run(
        [sys.executable, "-m", "ssltrain.cli", "train", str(config)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "\r" not in done.stderr
    assert "step 2/4: loss" in done.stderr and "step 4/4: loss" in done.stderr


def test_resuming_with_another_method_or_backbone_is_refused(shard_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, str(shard_dir), steps=2)
    train(cfg)
    for key, value in (("method.name", "simclr"), ("model.backbone", "resnet50")):
        other = tiny_config(tmp_path, str(shard_dir), steps=3, **{key: value})
        with pytest.raises(ConfigError, match=rf"another model \({re.escape(key)} .* start a new run"):
            train(other)
    assert Checkpointer(cfg.run_dir / "checkpoints").latest().name == "step-2"  # nothing was written over it


def _flip_bytes(file: Path, count: int = 64) -> None:
    """Invert ``count`` bytes in the middle of ``file`` in place: same size, other content."""
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    file.write_bytes(bytes(data))


def test_flipped_bytes_in_the_latest_checkpoint_stop_the_restart_naming_the_file(
    shard_dir: Path, tmp_path: Path
) -> None:
    """Issue 18: 64 flipped bytes in a .distcp file of the latest checkpoint used to load without complaint (NaN
    optimizer state, NaN weights one update later). The checksums in meta.json refuse them, naming the file and the
    way out, for the restart and for eval/export's loader; without checkpoint.fallback the error stands."""
    cfg = tiny_config(tmp_path, str(shard_dir), steps=4)
    train(cfg)
    (data,) = (cfg.run_dir / "checkpoints/step-4").glob("*.distcp")
    _flip_bytes(data)
    cfg.steps = 6
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(data))}' does not match the sha256.*fallback=true"):
        train(cfg)
    assert Checkpointer(cfg.run_dir / "checkpoints").latest().name == "step-4"  # nothing trained, nothing moved
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        load_checkpoint(cfg.run_dir)
    load_checkpoint(cfg.run_dir / "checkpoints/step-2")


def test_fallback_resumes_from_the_previous_checkpoint_as_if_never_stopped(
    shard_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """checkpoint.fallback=true: the damaged latest checkpoint is moved aside and the run resumes from the one
    before, ending with the weights of an uninterrupted run."""
    cfg = tiny_config(tmp_path / "run", str(shard_dir), **{"checkpoint.fallback": True})
    train(cfg, stop_after_steps=4)
    ckpts = cfg.run_dir / "checkpoints"
    (data,) = (ckpts / "step-4").glob("*.distcp")
    _flip_bytes(data)
    with caplog.at_level("INFO", logger="ssltrain"):
        train(cfg)
    assert f"{data}' does not match the sha256" in caplog.text
    assert f"moved it to {ckpts / 'step-4.corrupt'}; resuming from {ckpts / 'step-2'}" in caplog.text
    assert "resumed from" in caplog.text and "(step 2," in caplog.text
    assert (ckpts / "step-4.corrupt").is_dir() and (ckpts / "step-4/COMPLETE").is_file()  # step 4 written anew
    uninterrupted = train(tiny_config(tmp_path / "ref", str(shard_dir)))
    assert_same_params(final_params(cfg.run_dir), final_params(uninterrupted))


def test_the_final_checkpoint_refused_for_nonfinite_weights_is_an_error(shard_dir: Path, tmp_path: Path) -> None:
    """A periodic checkpoint of non-finite weights is skipped with an error in the log (the guard reloads); the
    final one is a CheckpointWriteError, so train() does not return as if the run had succeeded."""
    from ssltrain.core.checkpoint_layout import CheckpointWriteError
    from ssltrain.engine.run import build_run

    cfg = tiny_config(tmp_path, str(shard_dir), steps=2)
    run = build_run(cfg)
    try:
        with torch.no_grad():
            next(run.model.parameters()).fill_(float("nan"))
        run.step = 1
        run.save()
        run.step = 2
        with pytest.raises(CheckpointWriteError, match="step 2: the final checkpoint was not written"):
            run.save()
    finally:
        run.close()
    assert Checkpointer(cfg.run_dir / "checkpoints").latest() is None


def _cli_train(tmp_path: Path, cfg: Config, **popen: object) -> subprocess.CompletedProcess:
    config_file = tmp_path / "run.yaml"
    config_file.write_text(to_yaml(cfg))
    return subprocess.run(
        [sys.executable, "-m", "ssltrain.cli", "train", str(config_file)],
        capture_output=True,
        text=True,
        timeout=600,
        **popen,  # type: ignore[call-overload]
    )


def test_a_run_whose_weights_end_nonfinite_exits_nonzero(tmp_path: Path) -> None:
    """Issue 18 through the real CLI: a checkpoint whose optimizer state turns the weights into NaN used to end in
    exit 0 without its final checkpoint. Now the guard reloads it once, then stops the run: exit 2, one line naming
    the checkpoint."""
    from test_guard import poison_optimizer_state

    data = tmp_path / "data"
    data.mkdir()
    make_shards(data, [24, 24])
    cfg = tiny_config(tmp_path, str(data), steps=2)
    train(cfg)
    poisoned = poison_optimizer_state(cfg)
    cfg.steps = 6
    done = _cli_train(tmp_path, cfg)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"ssltrain train: error: the parameters are not finite again after reloading '{poisoned}'" in done.stderr
    assert Checkpointer(cfg.run_dir / "checkpoints").latest() == poisoned


def test_a_checkpoint_write_that_fails_exits_nonzero_with_one_line(tmp_path: Path) -> None:
    """A write that fails (here the file-size limit, as a full disk would) is a one-line error and exit 2 through
    the CLI, not a traceback from DCP's background exception; no checkpoint counts as written."""
    import resource

    data = tmp_path / "data"
    data.mkdir()
    make_shards(data, [24])
    cfg = tiny_config(tmp_path, str(data), steps=2)
    limit = 4 << 20  # the logs fit; the checkpoint's data file (ResNet-18 weights and Adam moments) does not

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = _cli_train(tmp_path, cfg, preexec_fn=limit_file_size)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "ssltrain train: error: cannot write checkpoint" in done.stderr and "File too large" in done.stderr
    assert "Traceback" not in done.stderr
    assert Checkpointer(cfg.run_dir / "checkpoints").latest() is None
