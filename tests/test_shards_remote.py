"""``ssltrain shards ... --out s3://bucket/prefix`` against moto's S3 server on loopback (driven through s3fs), and
``ssltrain shards verify`` checking a directory's manifest.

Checks: the uploaded set lists the same shards (paths, counts, sizes, sha256) as the same command writing to local
disk, and its samples read back equal; an upload that fails midway (503s from the fault proxy, after the store's
retries) leaves no manifest, and the rerun sends only the shards that were not in the store (counted as PUT
requests through the proxy; the others keep their ETag and LastModified); the endpoint may come from
AWS_ENDPOINT_URL instead of --endpoint-url; an --out on a web server (http(s)://) or under a scheme no store
handles is one clear error before any shard is staged or any connection made; verify names a listed shard that is
missing, one whose bytes changed (also under --no-decode) and one the manifest does not list.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from servers import FaultProxy, moto_s3

from ssltrain.cli import main as cli_main
from ssltrain.data.ingest.upload import UploadError, default_staging, upload_shard_set
from ssltrain.data.manifest import MANIFEST_NAME, read_manifest
from ssltrain.data.shards import read_index
from ssltrain.data.store import StoreOptions, filesystem, read_shard

pytest.importorskip("s3fs")
pytest.importorskip("moto")

BUCKET = "bucket"
SHAPES = ["shards", "shapes", "--train", "40", "--val", "10", "--shard-size", "10", "--size", "16", "--workers", "1"]
NAMES = [f"train-{i:06d}.tar" for i in range(4)] + ["val-000000.tar"]


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server with an empty bucket; yields the endpoint URL."""
    with moto_s3() as endpoint:
        filesystem("s3://", StoreOptions(endpoint_url=endpoint)).mkdir(BUCKET)
        yield endpoint


@pytest.fixture(scope="module")
def local_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same command writing to local disk: the reference."""
    out = tmp_path_factory.mktemp("local") / "shapes"
    assert cli_main([*SHAPES, "--out", str(out)]) == 0
    return out


def _members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]


def _objects(s3: str, prefix: str) -> dict[str, tuple[str, object]]:
    """name -> (ETag, LastModified) of every object under the prefix."""
    fs = filesystem("s3://", StoreOptions(endpoint_url=s3))
    fs.invalidate_cache()
    return {
        Path(key).name: (info["ETag"], info["LastModified"])
        for key, info in fs.find(f"{BUCKET}/{prefix}", detail=True).items()
    }


def test_shards_uploaded_to_s3_equal_the_local_set(s3: str, local_set: Path) -> None:
    url = f"s3://{BUCKET}/prefix"
    assert cli_main([*SHAPES, "--out", url, "--endpoint-url", s3]) == 0
    opts = StoreOptions(endpoint_url=s3)
    remote, local = read_manifest(url, opts), read_manifest(str(local_set))
    assert [s.path for s in remote.shards] == NAMES and [s.samples for s in remote.shards] == [10] * 5
    assert remote.shards == local.shards  # the same bytes: sizes and sha256 equal
    for shard in remote.shards:
        data = read_shard(remote.url(shard), opts)
        assert len(data) == shard.bytes and hashlib.sha256(data).hexdigest() == shard.sha256
        assert _members(data) == _members((local_set / shard.path).read_bytes())
        idx = shard.path.replace(".tar", ".idx")
        assert read_shard(f"{url}/{idx}", opts) == (local_set / idx).read_bytes()
    assert json.loads(read_shard(f"{url}/classes.json", opts)) == json.loads((local_set / "classes.json").read_text())
    assert not any(name.startswith(".") for name in _objects(s3, "prefix"))  # no plan record, no temporaries
    key = "shapes\ntrain\n"
    assert not default_staging(url, key).exists()  # the default staging directory goes after a complete upload

    # The endpoint from the client's own settings (botocore reads AWS_ENDPOINT_URL): a rerun finds every shard there.
    before = _objects(s3, "prefix")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", s3)
        assert cli_main([*SHAPES, "--out", url]) == 0
    after = _objects(s3, "prefix")
    shards = [n for n in before if n.endswith((".tar", ".idx"))]
    assert len(shards) == 10 and all(after[n] == before[n] for n in shards)  # classes.json and the manifest: again


def test_an_interrupted_upload_resumes_without_sending_finished_shards(s3: str, tmp_path: Path) -> None:
    url = f"s3://{BUCKET}/resume"
    staging = tmp_path / "staging"
    host, port = s3.removeprefix("http://").split(":")
    # Stage the set, then upload it through a proxy that starts answering 503 after a few requests.
    assert cli_main([*SHAPES, "--out", str(staging)]) == 0
    with FaultProxy((host, int(port))) as proxy:
        proxy.faults = [None] * 11 + ["503"] * 100
        flaky = StoreOptions(retries=2, backoff_s=0.01, timeout_s=2.0, endpoint_url=proxy.url)
        with pytest.raises(UploadError, match="run the same command again"):
            upload_shard_set(staging, url, flaky)
        assert sum(f == "503" for _, f in proxy.requests) == 3  # the first attempt and two retries
    first = _objects(s3, "resume")
    done = sorted(n for n in first if n.endswith(".tar"))
    assert 1 <= len(done) < len(NAMES) and MANIFEST_NAME not in first  # no manifest lists a partial set
    assert all(n.replace(".tar", ".idx") in first for n in done)  # a shard in the store has its index

    # The rerun (the whole command, staging again into the same directory) sends only what is missing.
    with FaultProxy((host, int(port))) as proxy:
        assert cli_main([*SHAPES, "--out", url, "--staging", str(staging), "--endpoint-url", proxy.url]) == 0
        puts = sorted(Path(r.split()[1].split("?")[0]).name for r, _ in proxy.requests if r.startswith("PUT"))
    missing = [n for n in NAMES if n not in done]
    assert puts == sorted([MANIFEST_NAME, "classes.json", *missing, *(n.replace(".tar", ".idx") for n in missing)])
    final = _objects(s3, "resume")
    assert all(final[n] == first[n] for n in done)  # untouched: same ETag and LastModified
    opts = StoreOptions(endpoint_url=s3)
    manifest = read_manifest(url, opts)
    assert [s.path for s in manifest.shards] == NAMES
    assert all(hashlib.sha256(read_shard(manifest.url(s), opts)).hexdigest() == s.sha256 for s in manifest.shards)
    assert staging.is_dir()  # --staging is the user's: kept

    # A shard replaced in the store by other bytes (its stored checksum no longer the staged one) is sent again.
    fs = filesystem("s3://", opts)
    fs.pipe_file(f"{BUCKET}/resume/{NAMES[0]}", b"x" * manifest.shards[0].bytes)
    with FaultProxy((host, int(port))) as proxy:
        assert cli_main([*SHAPES, "--out", url, "--staging", str(staging), "--endpoint-url", proxy.url]) == 0
        puts = sorted(Path(r.split()[1].split("?")[0]).name for r, _ in proxy.requests if r.startswith("PUT"))
    assert puts == sorted([MANIFEST_NAME, "classes.json", NAMES[0], NAMES[0].replace(".tar", ".idx")])
    assert hashlib.sha256(read_shard(manifest.url(manifest.shards[0]), opts)).hexdigest() == manifest.shards[0].sha256


def test_a_writer_killed_midway_resumes_from_the_default_staging(s3: str) -> None:
    url = f"s3://{BUCKET}/killed"
    staging = default_staging(url, "shapes\ntrain\n")
    shutil.rmtree(staging, ignore_errors=True)
    host, port = s3.removeprefix("http://").split(":")
    command = [sys.executable, "-m", "ssltrain.cli", *SHAPES, "--out", url]
    with FaultProxy((host, int(port))) as proxy:
        proxy.faults = [None] * 11 + ["stall"] * 100  # the upload hangs after its first shard: killed there
        proc = subprocess.Popen(
            [*command, "--endpoint-url", proxy.url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 60
            while not any(f == "stall" for _, f in proxy.requests) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert any(f == "stall" for _, f in proxy.requests), proxy.requests
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    first = _objects(s3, "killed")
    done = sorted(n for n in first if n.endswith(".tar"))
    assert 1 <= len(done) < len(NAMES) and MANIFEST_NAME not in first
    assert sorted(p.name for p in staging.glob("*.tar")) == NAMES  # what the killed run staged is still there
    with FaultProxy((host, int(port))) as proxy:
        assert cli_main([*command[3:], "--endpoint-url", proxy.url]) == 0
        puts = sorted(Path(r.split()[1].split("?")[0]).name for r, _ in proxy.requests if r.startswith("PUT"))
    missing = [n for n in NAMES if n not in done]
    assert puts == sorted([MANIFEST_NAME, "classes.json", *missing, *(n.replace(".tar", ".idx") for n in missing)])
    assert all(_objects(s3, "killed")[n] == first[n] for n in done)
    assert [s.path for s in read_manifest(url, StoreOptions(endpoint_url=s3)).shards] == NAMES
    assert not staging.exists()


def test_a_failing_store_is_one_clear_error(tmp_path: Path) -> None:
    from servers import free_port

    staging = tmp_path / "staging"
    assert cli_main([*SHAPES, "--out", str(staging)]) == 0
    dead = StoreOptions(retries=1, backoff_s=0.01, timeout_s=1.0, endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(UploadError, match="rerun|run the same command again"):
        upload_shard_set(staging, f"s3://{BUCKET}/dead", dead)


@pytest.mark.parametrize("scheme", ["https", "http", "ftp"])
def test_an_output_no_store_takes_is_refused_before_any_work(
    scheme: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--out on a web server (or a scheme no store handles) is one line naming the URL and the fix, given before any
    shard is staged and before any connection: the socket standing in for the server is never connected to."""
    monkeypatch.chdir(tmp_path)  # were ftp:// taken for a local path, its directory would appear here
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        out = f"{scheme}://127.0.0.1:{server.getsockname()[1]}/set"
        assert cli_main([*SHAPES, "--out", out]) == 2
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"--out '{out}'" in err
    assert ("serve that directory over HTTP" if scheme != "ftp" else "s3://bucket/prefix or gs://") in err
    assert not default_staging(out, "shapes\ntrain\n").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(UploadError, match="cannot be uploaded to a web server"):  # the library entry point too
        upload_shard_set(tmp_path, out.replace(scheme, "https", 1), StoreOptions())


def test_verify_checks_the_manifest(local_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "set"
    out.mkdir()
    for f in local_set.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    assert cli_main(["shards", "verify", str(out), "--workers", "1"]) == 0
    assert "5 shards, 50 samples: all good" in capsys.readouterr().out

    damaged, gone = out / NAMES[1], out / NAMES[2]
    label = read_index(damaged).samples[0].components["cls"]
    data = bytearray(damaged.read_bytes())
    data[label.offset] = ord("7") if data[label.offset] != ord("7") else ord("8")  # same size, still a valid label
    damaged.write_bytes(bytes(data))
    gone.unlink()
    gone.with_suffix(".idx").unlink()
    (out / "extra-000000.tar").write_bytes((out / NAMES[0]).read_bytes())
    (out / "extra-000000.idx").write_bytes((out / NAMES[0]).with_suffix(".idx").read_bytes())
    for flags in ([], ["--no-decode"]):
        assert cli_main(["shards", "verify", str(out), "--workers", "2", *flags]) == 1
        text = capsys.readouterr().out
        assert f"{damaged}: sha256 " in text and "differs from manifest.json's" in text
        assert f"{gone}: listed in manifest.json (10 samples) but missing" in text
        assert f"{out / 'extra-000000.tar'}: not listed in manifest.json" in text
        assert "5 shards, 50 samples: 3 problems in 3 shards" in text
    # --fix-index records the directory as it is: afterwards it verifies clean
    assert cli_main(["shards", "verify", str(out), "--fix-index", "--workers", "1"]) == 0
    capsys.readouterr()
    assert cli_main(["shards", "verify", str(out), "--workers", "1"]) == 0
    assert [s.path for s in read_manifest(str(out)).shards] == [
        "extra-000000.tar",
        *(n for n in NAMES if n != gone.name),
    ]
