"""Video: ingest with ffmpeg into clip shards, two-view clips and frames, and training on them (r3d_18, resnet18).

The videos are made by ffmpeg's test sources at test time (a few seconds, tens of pixels). Without ffmpeg on PATH
these tests skip, unless SSLTRAIN_REQUIRE_FFMPEG is set (CI: tests/video_setup.sh installs it), then they fail.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from ssltrain.config import ConfigError, check_video_config
from ssltrain.data import video_io
from ssltrain.data.augment import SampleRandom
from ssltrain.data.ingest import video as video_ingest
from ssltrain.data.loaders import video
from ssltrain.data.loaders.cpu import Sample, Skipped, collate_views
from ssltrain.data.shards import DataError, iter_members, read_index, write_shards
from ssltrain.data.stream import GlobalBatchSampler, ShardCatalog
from ssltrain.engine.checkpoint import Checkpointer
from ssltrain.engine.loop import train
from ssltrain.eval.metrics_log import read_metrics
from ssltrain.models.backbones import build_backbone

# ingest settings: 8 fps, 1 s clips (T=8), short side 32
FPS, CLIP_S, SHORT = 8, 1.0, 32
# (folder, name, lavfi source, seconds): 3 + 2 + 3 clips (bars: 2 whole and a 4-frame tail, half a clip, kept)
SOURCES = [
    ("alpha", "testsrc.mp4", "testsrc=size=64x48:rate=10", 3),  # moving
    ("alpha", "mandel.mp4", "mandelbrot=size=48x64:rate=10", 2),  # portrait, moving
    ("beta", "bars.mkv", "smptebars=size=64x48:rate=10", 2.5),  # static: every frame the same
]
STATIC_KEYS = ("000002_00000", "000002_00001")  # sorted files: alpha/mandel, alpha/testsrc, beta/bars, ...


@pytest.fixture(scope="module")
def ffmpeg_available() -> None:
    if shutil.which("ffmpeg") and shutil.which("ffprobe"):
        return
    if os.environ.get("SSLTRAIN_REQUIRE_FFMPEG"):
        pytest.fail("SSLTRAIN_REQUIRE_FFMPEG is set but ffmpeg/ffprobe are not on PATH; run tests/video_setup.sh")
    pytest.skip("ffmpeg/ffprobe not on PATH: run tests/video_setup.sh (set SSLTRAIN_REQUIRE_FFMPEG=1 to fail instead)")


@pytest.fixture(scope="module")
def video_root(tmp_path_factory: pytest.TempPathFactory, ffmpeg_available: None) -> Path:
    root = tmp_path_factory.mktemp("videos")
    for folder, name, source, seconds in SOURCES:
        (root / folder).mkdir(exist_ok=True)
        subprocess.run(
            [
                "ffmpeg",
                "-v",
                "error",
                "-nostdin",
                "-f",
                "lavfi",
                "-i",
                source,
                "-t",
                str(seconds),
                "-pix_fmt",
                "yuv420p",
                str(root / folder / name),
            ],
            check=True,
        )
    (root / "beta" / "corrupt.mp4").write_bytes(os.urandom(3000))
    (root / "empty.mp4").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def ingested(video_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[video_ingest.VideoIngestReport, Path]:
    out = tmp_path_factory.mktemp("shards")
    with pytest.warns(UserWarning, match="skipping video"):
        report = video_ingest.write_video_shards(
            [video_root], out, fps=FPS, short_side=SHORT, clip_seconds=CLIP_S, shard_samples=5
        )
    return report, out


def members(shards: list[Path]) -> dict[str, dict[str, bytes]]:
    return {entry.key: data for path in shards for entry, data in iter_members(read_index(path))}


def video_config(tmp_path: Path, train_spec: str, **overrides: object):
    base = {"data.modality": "video", "model.backbone": "r3d_18", "data.video.frames": 4, "data.batch_size": 4}
    return tiny_config(tmp_path, train_spec, **{**base, **overrides})


# deterministic spatial augmentation: the whole frame, square centre crop, nothing random
PLAIN = {
    "augment.global_crops.scale": "[1.0,1.0]",
    "augment.global_crops.ratio": "[1.0,1.0]",
    "augment.global_crops.flip_p": 0.0,
    "augment.global_crops.jitter_p": 0.0,
    "augment.global_crops.grayscale_p": 0.0,
    "augment.global_crops.blur_p": "[0.0]",
    "augment.global_crops.solarize_p": "[0.0]",
}


def test_ingest_writes_clips_with_metadata_and_skips_bad_files(ingested: tuple, video_root: Path) -> None:
    report, out = ingested
    assert (report.clips, report.videos, report.classes) == (8, 3, ["alpha", "beta"])
    assert report.encoder in ("libx264", "mpeg4")
    skipped = dict(report.skipped)
    assert set(skipped) == {video_root / "beta" / "corrupt.mp4", video_root / "empty.mp4"}
    assert skipped[video_root / "empty.mp4"] == "empty file (0 bytes)"
    assert skipped[video_root / "beta" / "corrupt.mp4"] and "@ 0x" not in skipped[video_root / "beta" / "corrupt.mp4"]
    assert [p.name for p in report.shards] == ["train-000000.tar", "train-000001.tar"]  # 5 + 3 clips
    assert all(p.with_suffix(".idx").is_file() for p in report.shards)
    samples = members(report.shards)
    metas = {key: json.loads(data["json"]) for key, data in samples.items()}
    assert [(m["source"], m["start_s"], m["frames"]) for m in metas.values()] == [
        ("alpha/mandel.mp4", 0.0, 8),
        ("alpha/mandel.mp4", 1.0, 8),
        ("alpha/testsrc.mp4", 0.0, 8),
        ("alpha/testsrc.mp4", 1.0, 8),
        ("alpha/testsrc.mp4", 2.0, 8),
        ("beta/bars.mkv", 0.0, 8),
        ("beta/bars.mkv", 1.0, 8),
        ("beta/bars.mkv", 2.0, 4),
    ]
    assert metas["000000_00000"]["width"] == 32 and metas["000000_00000"]["height"] == 42  # portrait, even sides
    assert metas["000001_00000"]["width"] == 42 and metas["000001_00000"]["height"] == 32
    assert all(m["fps"] == FPS for m in metas.values())
    assert [int(s["cls"]) for s in samples.values()] == [0] * 5 + [1] * 3
    for key in ("000000_00001", "000002_00002"):  # the stored clip holds what its metadata says
        m = metas[key]
        frames = video_io.decode_clip(samples[key]["mp4"], m["width"], m["height"])
        assert frames.shape == (m["frames"], m["height"], m["width"], 3)
        assert video_io.probe(samples[key]["mp4"]).fps == FPS


def test_parallel_ingest_writes_the_same_samples(ingested: tuple, video_root: Path, tmp_path: Path) -> None:
    report, _ = ingested
    with pytest.warns(UserWarning, match="skipping video"):
        again = video_ingest.write_video_shards(
            [video_root / "alpha", video_root / "beta", video_root / "empty.mp4"],
            tmp_path,
            fps=FPS,
            short_side=SHORT,
            clip_seconds=CLIP_S,
            shard_samples=5,
            workers=2,
        )
    a, b = members(report.shards), members(again.shards)
    assert list(a) == list(b) and len(again.skipped) == 2
    assert [json.loads(x["json"])["frames"] for x in a.values()] == [
        json.loads(x["json"])["frames"] for x in b.values()
    ]


def test_rerun_keeps_finished_clip_shards_and_encodes_only_what_a_missing_one_holds(
    ingested: tuple, video_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report, out = ingested
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    assert not list(copy.glob(".*-clips"))  # the staged clips are gone once every shard is written
    kwargs = dict(fps=FPS, short_side=SHORT, clip_seconds=CLIP_S, shard_samples=5)
    real, encoded = video_ingest._clips, []
    monkeypatch.setattr(video_ingest, "_clips", lambda unit, *a: encoded.append(unit.position) or real(unit, *a))
    again = video_ingest.write_video_shards([video_root], copy, **kwargs)
    assert encoded == [] and [p.name for p in again.shards] == [p.name for p in report.shards]
    assert (again.clips, again.videos, sorted(again.skipped)) == (8, 3, sorted(report.skipped))
    lost = copy / report.shards[1].name  # the clips of beta/bars.mkv (file 2)
    lost.unlink()
    lost.with_suffix(".idx").unlink()
    video_ingest.write_video_shards([video_root], copy, **kwargs)
    assert encoded == [2]
    a, b = members(report.shards), members(sorted(copy.glob("train-*.tar")))
    assert list(a) == list(b) and all(a[k]["json"] == b[k]["json"] for k in a)
    with pytest.raises(DataError, match="different video files or settings"):
        video_ingest.write_video_shards([video_root], copy, **{**kwargs, "fps": 4})


def test_no_readable_video_is_an_error_and_writes_nothing(video_root: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning), pytest.raises(DataError, match="none of the 2 video files gave a clip"):
        video_ingest.write_video_shards(
            [video_root / "beta" / "corrupt.mp4", video_root / "empty.mp4"], tmp_path / "out"
        )
    assert not (tmp_path / "out").exists()


def test_views_have_clip_and_frame_shapes(ingested: tuple, tmp_path: Path) -> None:
    _, out = ingested
    catalog = ShardCatalog.from_spec(str(out))
    clips = video.VideoClips(catalog, video_config(tmp_path, str(out)))
    batch = collate_views([clips[(i, i)] for i in (0, 4, 7)])  # 7: the 4-frame tail clip
    assert [tuple(v.shape) for v in batch.global_views] == [(3, 3, 4, 16, 16)] * 2 and batch.local_views == []
    assert batch.label.tolist() == [0, 0, 1] and batch.skipped == []
    frames = video.VideoClips(
        catalog, video_config(tmp_path, str(out), **{"data.video.mode": "frames", "model.backbone": "resnet18"})
    )
    batch = collate_views([frames[(i, i)] for i in (0, 7)])
    assert [tuple(v.shape) for v in batch.global_views] == [(2, 3, 16, 16)] * 2


def test_spatial_augmentation_is_the_same_for_every_frame_of_a_view(ingested: tuple, tmp_path: Path) -> None:
    _, out = ingested
    catalog = ShardCatalog.from_spec(str(out))
    strong = {
        "augment.global_crops.jitter_p": 1.0,
        "augment.global_crops.grayscale_p": 0.3,
        "augment.global_crops.blur_p": "[1.0]",
        "augment.global_crops.solarize_p": "[0.5]",
        "data.video.frames": 6,
    }
    dataset = video.VideoClips(catalog, video_config(tmp_path, str(out), **strong))
    static = [catalog.keys.index(key) for key in STATIC_KEYS]
    raw = catalog.read(static[0]).image
    source = torch.from_numpy(video_io.decode_clip(raw, 42, 32).copy())
    assert all(torch.equal(source[0], f) for f in source)  # the premise: a static clip
    views = []
    for position in range(3):
        sample = dataset[(static[position % 2], position)]
        assert isinstance(sample, Sample)
        for view in sample.global_views:  # [3, T, H, W]
            assert all(torch.equal(view[:, 0], view[:, t]) for t in range(1, view.shape[1]))
            views.append(view[:, 0])
    assert all(not torch.equal(views[0], v) for v in views[1:])  # and the augmentation does vary between views


def test_zero_gap_gives_frames_of_the_same_time(ingested: tuple, tmp_path: Path) -> None:
    _, out = ingested
    catalog = ShardCatalog.from_spec(str(out))
    moving = range(5)  # mandelbrot and testsrc clips
    same_time = video.VideoClips(
        catalog,
        video_config(
            tmp_path,
            str(out),
            **PLAIN,
            **{"data.video.mode": "frames", "model.backbone": "resnet18", "data.video.max_gap_s": 0.0},
        ),
    )
    for i in moving:
        a, b = same_time[(i, i)].global_views
        assert torch.equal(a, b)
    apart = video.VideoClips(
        catalog,
        video_config(
            tmp_path,
            str(out),
            **PLAIN,
            **{"data.video.mode": "frames", "model.backbone": "resnet18", "data.video.max_gap_s": 1.0},
        ),
    )
    assert any(not torch.equal(*apart[(i, i)].global_views) for i in moving)


def test_windows_lie_within_the_clip_and_the_gap() -> None:
    rng = SampleRandom(0)
    gaps = set()
    for _ in range(300):
        a, b = video.draw_windows(frames=32, fps=8.0, length=8, max_gap_s=0.5, rng=rng)
        assert a == list(range(a[0], a[0] + 8)) and b == list(range(b[0], b[0] + 8)) and max(a + b) < 32
        gaps.add(abs(a[0] - b[0]))
    assert gaps == {0, 1, 2, 3, 4}  # 0.5 s at 8 fps: every gap of 0..4 frames, none longer
    assert video.draw_windows(frames=3, fps=8.0, length=5, max_gap_s=1.0, rng=rng) == [[0, 1, 2, 2, 2]] * 2


def test_views_are_a_function_of_seed_and_position_and_resume_exactly(ingested: tuple, tmp_path: Path) -> None:
    _, out = ingested
    catalog = ShardCatalog.from_spec(str(out))
    cfg = video_config(tmp_path, str(out), **{"data.workers": 0})
    dataset = video.VideoClips(catalog, cfg)
    first, again, other = dataset[(2, 11)], dataset[(2, 11)], dataset[(2, 12)]
    assert all(torch.equal(x, y) for x, y in zip(first.global_views, again.global_views))
    assert not torch.equal(first.global_views[0], other.global_views[0])
    whole = list(
        video.build_video_loader(cfg, catalog, GlobalBatchSampler(len(catalog), 4, cfg.seed, 0, 8), torch.device("cpu"))
    )
    cfg.data.workers = 2
    resumed = list(
        video.build_video_loader(cfg, catalog, GlobalBatchSampler(len(catalog), 4, cfg.seed, 4, 8), torch.device("cpu"))
    )
    assert len(whole) == 2 and len(resumed) == 1 and torch.equal(whole[1].index, resumed[0].index)
    assert all(torch.equal(x, y) for x, y in zip(whole[1].global_views, resumed[0].global_views))


def test_undecodable_clip_in_a_shard_is_skipped_and_reported(
    ingested: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report, _ = ingested
    good = members(report.shards)["000001_00000"]
    samples = [
        {"__key__": "good", "mp4": good["mp4"], "json": good["json"]},
        {"__key__": "garbage", "mp4": os.urandom(4000), "json": good["json"]},
        {"__key__": "nometa", "mp4": good["mp4"]},  # no .json: probed with ffprobe instead
        {"__key__": "good2", "mp4": good["mp4"], "json": good["json"]},
    ]
    (shard,) = write_shards(samples, tmp_path / "bad", "train")
    catalog = ShardCatalog.from_spec(str(shard))
    dataset = video.VideoClips(catalog, video_config(tmp_path, str(shard)))
    batch = collate_views([dataset[(i, i)] for i in range(4)])
    assert batch.index.tolist() == [0, 2, 3] and len(batch.skipped) == 1
    assert batch.skipped[0].startswith(f"{shard}:garbage: cannot decode clip (")
    monkeypatch.setattr(video, "DECODE_TIMEOUT_S", 1e-4)  # a stuck ffmpeg is killed, not waited for
    stuck = dataset[(0, 0)]
    assert isinstance(stuck, Skipped) and "timed out" in stuck.reason


def test_clips_need_a_video_backbone_and_frames_an_image_backbone(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.backbone=r3d_18 or data.video.mode=frames"):
        check_video_config(video_config(tmp_path, "x", **{"model.backbone": "resnet18"}))
    with pytest.raises(ConfigError, match="data.video.mode=clips or an image backbone"):
        check_video_config(video_config(tmp_path, "x", **{"data.video.mode": "frames"}))
    net, dim = build_backbone("r3d_18")
    assert dim == 512 and net(torch.randn(2, 3, 4, 16, 16)).shape == (2, 512)


@pytest.mark.parametrize(
    "overrides",
    [
        {"model.backbone": "r3d_18", "data.video.mode": "clips", "data.video.frames": 4, "data.workers": 1},
        {"model.backbone": "resnet18", "data.video.mode": "frames"},
    ],
    ids=["r3d_18-clips", "resnet18-frames"],
)
def test_training_on_video_writes_a_checkpoint(ingested: tuple, tmp_path: Path, overrides: dict) -> None:
    _, out = ingested
    run = train(video_config(tmp_path, str(out), steps=3, **{"checkpoint.every": 3}, **overrides))
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["data_skipped"] == 0
    assert all(r["loss"] == r["loss"] for r in records)  # finite
    assert Checkpointer(run / "checkpoints").latest().name == "step-3"


def test_cli_ingests_videos_and_verify_decodes_every_clip(video_root: Path, tmp_path: Path, capsys, caplog) -> None:
    from ssltrain.cli import main

    out = tmp_path / "clips"
    caplog.set_level(logging.INFO, logger="ssltrain")
    assert (
        main(
            [
                "shards",
                "video",
                str(video_root / "alpha"),
                str(video_root / "beta"),
                "--out",
                str(out),
                "--fps",
                str(FPS),
                "--short-side",
                str(SHORT),
                "--clip-seconds",
                str(CLIP_S),
                "--workers",
                "1",
            ]
        )
        == 0
    )
    # The summary names what was skipped (the warning itself may have been shown once already, by another test).
    assert "8 clips from 3 videos" in caplog.text and "1 videos skipped" in caplog.text
    assert "corrupt.mp4" in caplog.text
    assert main(["shards", "verify", str(out), "--workers", "1"]) == 0
    assert "8 samples: all good" in capsys.readouterr().out
    # A clip whose bytes are damaged inside a shard is named by verify.
    samples = [{"__key__": key, **data} for key, data in members(sorted(out.glob("*.tar"))).items()]
    samples[1]["mp4"] = samples[1]["mp4"][:200]
    write_shards(samples, tmp_path / "damaged", "train")
    assert main(["shards", "verify", str(tmp_path / "damaged"), "--workers", "1"]) == 1
    assert f"{samples[1]['__key__']}: video does not decode" in capsys.readouterr().out


def test_video_shards_with_the_image_modality_are_a_config_error(ingested: tuple, tmp_path: Path) -> None:
    _, shards = ingested
    cfg = tiny_config(tmp_path, str(shards))
    with pytest.raises(ConfigError, match="holds 8 video clips; train on them with data.modality=video"):
        train(cfg)
