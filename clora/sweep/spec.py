"""A sweep file: one base experiment and the overrides that make N tenants of it (pure; no runtime).

    seeds = 2                              # each point runs with experiment seeds 0, 1 (or a list: [3, 7])
    [runtime]                              # as in a `clora run` file: model, engine, trainer, run_dir
    model = { source = "smollm2" }
    [base]                                 # an [[experiments]] table without its name
    steps = 6
    env = { difficulty = 1, held_out_size = 64 }
    [grid]                                 # dotted field paths, each with a list: the cartesian product
    "optim.lr" = [3e-4, 1e-3]
    [[points]]                             # and/or explicit points; with a grid, each point x each grid cell
    loss = { kind = "cispo", clip_high = 4.0 }

A point is a set of overrides (dotted field path -> value) applied to ``[base]``; a table value
is merged into the base's table (``env = { difficulty = 2 }`` keeps the base's other env fields).
Each (point, seed) is one tenant, named from its overrides (``lr-0.001_kind-cispo_s0``; a point's
``name`` key names it instead). The seed is the experiment seed (problem order, and sampling once
seeded sampling lands); ``env.seed`` (the held-out split) stays as the base sets it, so every
tenant is measured on the same problems. Every problem becomes one ``ConfigError`` naming the
field as written in the sweep file (``grid.optim.lr: expected float, got str``).
"""

from __future__ import annotations

import copy
import itertools
import re
from collections import Counter
from typing import Any

import msgspec
import msgspec.inspect as mi

from clora.config import CPU_LORAS_HEADROOM, ExperimentConfig, RuntimeConfig, validate_tenant_name
from clora.errors import ConfigError, describe_validation_error

__all__ = ["SweepFile", "SweepPoint", "SweepTenant", "Sweep", "decode_sweep", "expand", "point_label"]

class SweepFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The TOML file as written (tables not yet checked against the experiment's fields)."""

    runtime: dict[str, Any] = {}
    base: dict[str, Any] = {}
    grid: dict[str, Any] = {}
    points: list[dict[str, Any]] = []
    seeds: int | list[int] = 1


class SweepPoint(msgspec.Struct, frozen=True, kw_only=True):
    """One combination of overrides; ``origins`` says where in the file each override came from."""

    index: int
    label: str  # the tenants' name stem
    overrides: dict[str, Any]  # dotted field path -> value, in file order
    origins: dict[str, str]  # dotted field path -> "grid.optim.lr" / "points[1].optim.lr"


class SweepTenant(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    point: int  # index into Sweep.points
    seed: int
    experiment: ExperimentConfig


class Sweep(msgspec.Struct, frozen=True, kw_only=True):
    """The expanded sweep: one runtime and its tenants (``runtime.experiments`` holds every tenant's config)."""

    runtime: RuntimeConfig
    points: list[SweepPoint]
    seeds: list[int]
    tenants: list[SweepTenant]

    def tenants_of(self, point: int) -> list[SweepTenant]:
        return [t for t in self.tenants if t.point == point]


def decode_sweep(data: bytes | str) -> SweepFile:
    """Parse a sweep file's TOML; unknown top-level keys and wrong table types are a ConfigError."""
    try:
        return msgspec.toml.decode(data, type=SweepFile)
    except msgspec.ValidationError as e:
        raise ConfigError(describe_validation_error(e, SweepFile)) from None
    except msgspec.DecodeError as e:
        raise ConfigError(f"malformed TOML: {e}") from None


# ----------------------------------------------------------------------------- field paths


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": x}}`` and ``{"optim.lr": x}`` -> ``{"optim.lr": x}``. An experiment has no
    table-valued field, so every table is a level of the path."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        path = _join(prefix, str(key))
        if isinstance(value, dict):
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    return flat


def _check_path(path: str, where: str) -> None:
    """``path`` names a field of ExperimentConfig (or a sub-table of one); ``where`` names it in errors."""
    if path == "name":
        raise ConfigError(f"{where}: a sweep names its tenants from their overrides (a point may set `name`)")
    if path == "seed":
        raise ConfigError(f"{where}: the experiment seed is the sweep's seed axis: set `seeds = N` (or a list)")
    info: Any = mi.type_info(ExperimentConfig)
    done: list[str] = []
    for part in path.split("."):
        if isinstance(info, mi.UnionType):  # X | None
            info = next((t for t in info.types if not isinstance(t, mi.NoneType)), info)
        if not isinstance(info, mi.StructType):
            raise ConfigError(f"{where}: unknown field; {'.'.join(done)} is a value, not a table")
        field = next((f for f in info.fields if f.encode_name == part), None)
        if field is None:
            valid = ", ".join(f.encode_name for f in info.fields if (done or f.encode_name not in ("name", "seed")))
            raise ConfigError(f"{where}: unknown field; valid fields here: {valid}")
        info = field.type
        done.append(part)


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted path in a nested dict (the base experiment); a table value is merged into the
    table already there."""
    *parents, last = path.split(".")
    node = tree
    for k, part in enumerate(parents):
        if part not in node:
            node[part] = {}
        elif not isinstance(node[part], dict):
            where = ".".join(parents[: k + 1])
            raise ConfigError(f"base.{where}: expected a table, got {type(node[part]).__name__}")
        node = node[part]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        for key, inner in value.items():
            _set(node[last], key, inner)
    else:
        node[last] = copy.deepcopy(value)


# ----------------------------------------------------------------------------- naming


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(value, "g").replace("+", "")
    if isinstance(value, (list, tuple)):
        return ".".join(_format_value(v) for v in value)
    if isinstance(value, dict):
        return "-".join(f"{k}-{_format_value(v)}" for k, v in _flatten(value).items())
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(value)).strip("-")


def point_label(overrides: dict[str, Any], short: dict[str, str]) -> str:
    """``lr-0.001_kind-cispo``: each override as ``key-value``; ``short`` maps a path to its key."""
    return "_".join(f"{short.get(path, path)}-{_format_value(value)}" for path, value in overrides.items()) or "base"


def _short_keys(paths: list[str]) -> dict[str, str]:
    """A path's last part when no other path of the sweep ends the same way, else the whole path."""
    last = Counter(p.rsplit(".", 1)[-1] for p in paths)
    return {p: p.rsplit(".", 1)[-1] if last[p.rsplit(".", 1)[-1]] == 1 else p for p in paths}


def _tenant_name(label: str, index: int, seed: int) -> str:
    """``<label>_s<seed>``; ``p<index>_s<seed>`` when the label does not make a valid tenant name."""
    name = f"{label}_s{seed}"
    try:
        return validate_tenant_name(name)
    except ConfigError:
        return f"p{index}_s{seed}"


# ----------------------------------------------------------------------------- expansion


def _grid_axes(grid: dict[str, Any]) -> dict[str, list[Any]]:
    axes: dict[str, list[Any]] = {}
    for path, values in _flatten(grid).items():
        where = f"grid.{path}"
        _check_path(path, where)
        if not isinstance(values, list):
            raise ConfigError(f"{where}: expected a list of values, got {type(values).__name__} "
                              f"(a single value belongs in [base])")
        if not values:
            raise ConfigError(f"{where}: empty list; give at least one value")
        seen: list[Any] = []
        for value in values:
            if value in seen:
                raise ConfigError(f"{where}: value {value!r} appears twice")
            seen.append(value)
        axes[path] = values
    return axes


def _seeds(seeds: int | list[int]) -> list[int]:
    if isinstance(seeds, int):
        if seeds < 1:
            raise ConfigError(f"seeds: must be >= 1 (runs per point), got {seeds}")
        return list(range(seeds))
    if not seeds:
        raise ConfigError("seeds: empty list; give at least one seed")
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: give distinct seeds >= 0, got {seeds}")
    return list(seeds)


def _points(file: SweepFile) -> list[SweepPoint]:
    axes = _grid_axes(file.grid)
    explicit: list[tuple[str | None, dict[str, Any], str]] = []
    for j, raw in enumerate(file.points or [{}]):
        where = f"points[{j}]" if file.points else ""
        raw = dict(raw)
        name = raw.pop("name", None)
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"{where}.name: expected str, got {type(name).__name__}")
        overrides = _flatten(raw)
        for path in overrides:
            _check_path(path, f"{where}.{path}")
            if path in axes:
                raise ConfigError(f"{where}.{path}: also a grid axis; a point may not set a field the grid sweeps")
        explicit.append((name, overrides, where))
    cells = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    short = _short_keys(list(dict.fromkeys([*axes, *(p for _, o, _ in explicit for p in o)])))
    points: list[SweepPoint] = []
    for name, overrides, where in explicit:
        for cell in cells:
            merged = {**overrides, **cell}
            origins = {**{p: f"{where}.{p}" for p in overrides}, **{p: f"grid.{p}" for p in cell}}
            label = name if name is not None else point_label(merged, short)
            if name is not None and len(cells) > 1:
                label = f"{name}_{point_label(cell, short)}"
            points.append(SweepPoint(index=len(points), label=label, overrides=merged, origins=origins))
    return points


def _problem(point: SweepPoint, detail: str, tenant: str) -> ConfigError:
    """``detail`` ("optim.lr: must be > 0, got -1") named where the sweep file sets that field."""
    path, _, problem = detail.partition(": ")
    field = path.split("/")[0]
    for override, origin in point.origins.items():
        if field == override or field.startswith(override + ".") or override.startswith(field + "."):
            value = point.overrides[override]
            return ConfigError(f"{origin}: {problem} (value {value!r}, tenant {tenant!r})")
    return ConfigError(f"base.{path}: {problem} (tenant {tenant!r})")


class _One(msgspec.Struct):
    experiment: ExperimentConfig


class _Runtime(msgspec.Struct):
    runtime: RuntimeConfig


def _experiment(file: SweepFile, point: SweepPoint, name: str, seed: int) -> ExperimentConfig:
    data = copy.deepcopy(file.base)
    for path, value in point.overrides.items():
        _set(data, path, value)
    data["name"], data["seed"] = name, seed
    try:
        return msgspec.convert({"experiment": data}, _One).experiment
    except msgspec.ValidationError as e:
        detail = describe_validation_error(e, _One).removeprefix("experiment.")
        raise _problem(point, detail, name) from None


def _runtime(file: SweepFile, run_dir: str) -> RuntimeConfig:
    if "experiments" in file.runtime:
        raise ConfigError("runtime.experiments: a sweep makes its experiments from [base], [grid] and [[points]]")
    try:
        runtime = msgspec.convert({"runtime": {"run_dir": run_dir, **file.runtime}}, _Runtime).runtime
    except msgspec.ValidationError as e:
        raise ConfigError(describe_validation_error(e, _Runtime)) from None
    return runtime


def expand(file: SweepFile, *, run_dir: str = "runs/sweep") -> Sweep:
    """Every (point, seed) as a tenant on one runtime. ``run_dir``: used when ``[runtime]`` sets none.

    When ``[runtime.engine]`` leaves ``max_cpu_loras`` unset and the tenants outnumber the
    engine's default CPU adapter cache, it is raised to the number of tenants (so no update is
    evicted while its tenant trains).
    """
    for path in _flatten(file.base):
        _check_path(path, f"base.{path}")
    seeds = _seeds(file.seeds)
    points = _points(file)
    runtime = _runtime(file, run_dir)
    tenants: list[SweepTenant] = []
    owner: dict[str, SweepPoint] = {}
    for point in points:
        for seed in seeds:
            name = _tenant_name(point.label, point.index, seed)
            if name in owner:
                first = owner[name]
                where = ", ".join(point.origins.values()) or "the base"
                raise ConfigError(
                    f"{where}: tenant name {name!r} also names point {first.index} ({first.overrides}); "
                    "two points with the same overrides or the same `name`?"
                )
            owner[name] = point
            tenants.append(SweepTenant(name=name, point=point.index, seed=seed,
                                       experiment=_experiment(file, point, name, seed)))
    engine = runtime.engine
    if "max_cpu_loras" not in file.runtime.get("engine", {}) and len(tenants) > engine.max_loras + \
            CPU_LORAS_HEADROOM:
        engine = msgspec.structs.replace(engine, max_cpu_loras=len(tenants))
    try:
        runtime = msgspec.structs.replace(runtime, engine=engine, experiments=tuple(t.experiment for t in tenants))
    except ConfigError as e:  # a check across tenants and the runtime (lora.rank vs engine.max_lora_rank)
        found = re.match(r"experiments\[(\d+)\]\.(.*)$", getattr(e, "field", ""))
        if found is None:
            raise
        tenant = tenants[int(found[1])]
        problem = re.sub(r"\s*\(tenant '[^']*'\)$", "", e.problem)  # _problem names the tenant
        raise _problem(points[tenant.point], f"{found[2]}: {problem}", tenant.name) from None
    return Sweep(runtime=runtime, points=points, seeds=seeds, tenants=tenants)

