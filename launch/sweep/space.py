"""What a sweep varies: axes of levels, each level a set of ``key=value`` overrides, and the points they make.

An axis is a config key with a list of values (``optim.lr=0.001,0.002`` on the command line) or, in a sweep file,
a named axis whose levels each set several keys together (``strength: {weak: {...}, strong: {...}}``): the
interplay study moves crop scale and colour jitter as one augmentation strength. Points are the grid (every
combination) or ``random`` of them drawn with a seed, and each point is named by its levels, so re-running a
sweep with a value added keeps the names (and the finished runs) of the points it had.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ssltrain.config import ConfigError

__all__ = ["Axis", "Level", "Point", "SweepSpec", "parse_axis_arg", "split_values", "load_sweep_file"]

# Search ranges for Optuna (``--optuna``): ``key=range(lo,hi)``, ``key=logrange(lo,hi)``, ``key=intrange(lo,hi)``.
RANGE = re.compile(r"^(range|logrange|intrange)\(\s*([^,]+?)\s*,\s*([^,]+?)\s*\)$")


@dataclass(frozen=True)
class Level:
    """One value of an axis: its label (in point names and reports) and the overrides it sets."""

    label: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Axis:
    """A swept setting: a config key (levels are its values) or a named group of keys moved together.

    ``search`` holds an Optuna range instead of levels: ``("range" | "logrange" | "intrange", lo, hi)``.
    """

    name: str
    levels: tuple[Level, ...] = ()
    search: tuple[str, float, float] | None = None

    @property
    def labels(self) -> list[str]:
        return [level.label for level in self.levels]


@dataclass(frozen=True)
class Point:
    """One run of the sweep: its directory name, the level label of each axis, and its overrides."""

    name: str
    values: dict[str, str]
    overrides: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "values": dict(self.values), "overrides": list(self.overrides)}


@dataclass
class SweepSpec:
    """A whole sweep: the base training config, fixed overrides, the axes and how points are chosen."""

    name: str
    config: str
    overrides: list[str] = field(default_factory=list)
    axes: list[Axis] = field(default_factory=list)
    probe: str = "knn_top1"  # the figure points are sorted by (see ssltrain.launch.sweep.results)
    random: int = 0  # > 0: this many grid points drawn with ``seed`` instead of the whole grid
    seed: int = 0

    def grid_size(self) -> int:
        size = 1
        for axis in self.axes:
            size *= len(axis.levels)
        return size

    def points(self) -> list[Point]:
        """The grid in axis order (the last axis varies fastest), or ``random`` of its points, in grid order."""
        searched = [a.name for a in self.axes if a.search is not None]
        if searched:
            raise ConfigError(
                f"sweep '{self.name}': {', '.join(searched)} give a search range, which only --optuna samples; "
                "give a list of values (key=a,b,c) for a grid"
            )
        combos = list(itertools.product(*(axis.levels for axis in self.axes)))
        if self.random and self.random < len(combos):
            chosen = sorted(random.Random(self.seed).sample(range(len(combos)), self.random))
            combos = [combos[i] for i in chosen]
        short = short_names([axis.name for axis in self.axes])
        return [self.point(dict(zip([a.name for a in self.axes], combo)), short) for combo in combos]

    def point(self, levels: Mapping[str, Level], short: Mapping[str, str] | None = None) -> Point:
        short = short or short_names(list(levels))
        name = "_".join(f"{short[axis]}={_safe(level.label)}" for axis, level in levels.items()) or "base"
        overrides = tuple(o for level in levels.values() for o in level.overrides)
        return Point(name[:200], {axis: level.label for axis, level in levels.items()}, overrides)

    def to_dict(self) -> dict[str, Any]:
        axes: dict[str, Any] = {}
        for axis in self.axes:
            if axis.search is not None:
                kind, lo, hi = axis.search
                axes[axis.name] = f"{kind}({lo:g},{hi:g})"
            else:
                axes[axis.name] = {level.label: list(level.overrides) for level in axis.levels}
        return {
            "name": self.name,
            "config": self.config,
            "overrides": list(self.overrides),
            "axes": axes,
            "probe": self.probe,
            "random": self.random,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepSpec:
        """Inverse of :meth:`to_dict` (the ``sweep.yaml`` a sweep directory keeps)."""
        axes = []
        for name, levels in data.get("axes", {}).items():
            if isinstance(levels, str):
                axes.append(parse_axis_arg(f"{name}={levels}"))
            else:
                axes.append(Axis(name, tuple(Level(str(k), tuple(v)) for k, v in levels.items())))
        return cls(
            name=data["name"],
            config=data["config"],
            overrides=list(data.get("overrides", [])),
            axes=axes,
            probe=data.get("probe", "knn_top1"),
            random=int(data.get("random", 0)),
            seed=int(data.get("seed", 0)),
        )


def short_names(axes: Sequence[str]) -> dict[str, str]:
    """Each axis by the last part of its key (``optim.lr`` -> ``lr``) unless two axes would share it."""
    last = [axis.rsplit(".", 1)[-1] for axis in axes]
    return {axis: (tail if last.count(tail) == 1 else axis) for axis, tail in zip(axes, last)}


def _safe(label: str) -> str:
    """A level label as a directory-name part: ``[0.3, 1.0]`` -> ``0.3-1.0``."""
    text = re.sub(r"[\[\]{}()'\" ]", "", label)
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


def split_values(text: str) -> list[str]:
    """Split ``a,b,[1,2],c`` on the commas outside brackets: ``['a', 'b', '[1,2]', 'c']``."""
    values, depth, current = [], 0, ""
    for char in text:
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    if depth != 0 or any(v == "" for v in values):
        raise ConfigError(f"sweep values '{text}': unbalanced brackets or an empty value (write key=a,b,c)")
    return values


def parse_axis_arg(arg: str) -> Axis:
    """``key=v1,v2`` -> an axis of those values; ``key=logrange(1e-4,1e-2)`` -> an Optuna search range."""
    key, sep, text = arg.partition("=")
    if not sep or not key:
        raise ConfigError(f"sweep axis '{arg}' is not key=v1,v2,...")
    match = RANGE.match(text.strip())
    if match:
        kind, lo, hi = match.groups()
        try:
            low, high = float(lo), float(hi)
        except ValueError:
            raise ConfigError(f"sweep range '{arg}': bounds must be numbers, e.g. {key}=logrange(1e-4,1e-2)") from None
        if not low < high or (kind == "logrange" and low <= 0):
            raise ConfigError(f"sweep range '{arg}': need 0 < lo < hi for logrange, lo < hi otherwise")
        return Axis(key, search=(kind, low, high))
    values = split_values(text)
    return Axis(key, tuple(Level(v, (f"{key}={v}",)) for v in values))


def _override(key: str, value: Any) -> str:
    """``key=value`` with the value in YAML flow style, as OmegaConf's dotlist parses it back."""
    if isinstance(value, str):
        return f"{key}={value}"
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def _axis_from_yaml(name: str, levels: Any, where: str) -> Axis:
    if isinstance(levels, list):
        return Axis(name, tuple(Level(_label(v), (_override(name, v),)) for v in levels))
    if isinstance(levels, str):
        return parse_axis_arg(f"{name}={levels}")
    if isinstance(levels, Mapping):
        out = []
        for label, sets in levels.items():
            if not isinstance(sets, Mapping):
                raise ConfigError(f"{where}: level '{label}' of axis '{name}' must map config keys to values")
            out.append(Level(str(label), tuple(_override(k, v) for k, v in sets.items())))
        return Axis(name, tuple(out))
    raise ConfigError(f"{where}: axis '{name}' must be a list of values or a mapping of named levels")


def _label(value: Any) -> str:
    return value if isinstance(value, str) else _override("x", value).removeprefix("x=")


def load_sweep_file(path: Path) -> dict[str, Any]:
    """A sweep file's fields: ``config`` (the base training YAML, relative to the sweep file or the working
    directory), ``name``, ``overrides`` (list of key=value or a mapping), ``axes``, ``probe``, ``random``, ``seed``."""
    where = str(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict) or "axes" not in data or "config" not in data:
        raise ConfigError(f"{where}: a sweep file needs 'config' (the training YAML) and 'axes'")
    unknown = set(data) - {"config", "name", "overrides", "axes", "probe", "random", "seed"}
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
    config = Path(data["config"])
    if not config.is_file() and (path.parent / config).is_file():
        config = path.parent / config
    overrides = data.get("overrides") or []
    if isinstance(overrides, Mapping):
        overrides = [_override(k, v) for k, v in overrides.items()]
    return {
        "name": data.get("name") or path.stem,
        "config": str(config),
        "overrides": [str(o) for o in overrides],
        "axes": [_axis_from_yaml(str(k), v, where) for k, v in (data["axes"] or {}).items()],
        "probe": data.get("probe", "knn_top1"),
        "random": int(data.get("random", 0)),
        "seed": int(data.get("seed", 0)),
    }


def is_sweep_file(path: Path) -> bool:
    """A YAML with top-level ``axes`` is a sweep file; any other YAML is a training config."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "axes" in data


def build_spec(
    config: str,
    args: Iterable[str],
    name: str | None = None,
    probe: str | None = None,
    random_points: int | None = None,
    seed: int | None = None,
) -> SweepSpec:
    """The sweep of ``ssltrain sweep CONFIG args...``: an arg with several values (or a range) is an axis, one with
    a single value a fixed override. CONFIG is a training YAML or a sweep file; command-line axes add to its axes."""
    path = Path(config)
    fields: dict[str, Any] = (
        load_sweep_file(path)
        if is_sweep_file(path)
        else {"name": f"{path.stem}-sweep", "config": config, "overrides": [], "axes": []}
    )
    for arg in args:
        axis = parse_axis_arg(arg)
        if axis.search is None and len(axis.levels) == 1:
            fields["overrides"].append(arg)
        else:
            fields["axes"] = [a for a in fields["axes"] if a.name != axis.name] + [axis]
    if name:
        fields["name"] = name
    if probe:
        fields["probe"] = probe
    if random_points is not None:
        fields["random"] = random_points
    if seed is not None:
        fields["seed"] = seed
    return SweepSpec(**fields)
