"""Quantization recipes: YAML with defaults, per-op-type settings and path-pattern overrides.

    version: 1
    name: w8a8
    defaults: {input: {...QSpec...}, weight: {...}, output: null}
    ops:       {softmax: {output: {bits: 8, signed: false}}}
    overrides: {"decoder.layers.*.self_attn.softmax": {bits: 8, signed: false},
                "re:encoder\\.layers\\.0\\..*": {weight: {bits: 8}}}

Override / op values take role keys ``input``, ``weight``, ``output`` (a partial QSpec, or null for
``output``), or bare QSpec fields as a shorthand for the activation roles (input, and output when
present). Patterns are globs on the module path (a wrapper ``softmax_0`` also answers to
``softmax``); a ``re:`` prefix makes a full-match regular expression.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import yaml

from .modules import OP_CLASSES, QConfig
from .qtype import QSpec, SpecError
from .schedule import Schedule, ScheduleError

RECIPE_VERSION = 1
RECIPE_DIR = Path(__file__).resolve().parents[2] / "configs" / "quant"
_TOP_KEYS = {"version", "name", "description", "defaults", "ops", "overrides", "schedule"}
_ROLES = ("input", "weight", "output")
_SPEC_KEYS = {f.name for f in fields(QSpec)}


class RecipeError(ValueError):
    """Invalid recipe; the message names the file and the field."""


@dataclass
class Recipe:
    name: str
    defaults: QConfig
    ops: Dict[str, Mapping[str, Any]] = field(default_factory=dict)
    overrides: List[Tuple[str, Mapping[str, Any]]] = field(default_factory=list)
    source: str = "<dict>"
    version: int = RECIPE_VERSION
    schedule: Optional[Schedule] = None

    def config_for(self, path: str, op_type: str) -> QConfig:
        """QConfig of the op of type ``op_type`` at module ``path``."""
        cfg = self.defaults
        if op_type in self.ops:
            cfg = _apply(cfg, self.ops[op_type], f"{self.source}: ops.{op_type}")
        for pattern, value in self.overrides:
            if path_matches(pattern, path):
                cfg = _apply(cfg, value, f"{self.source}: overrides[{pattern!r}]")
        return cfg

    def unmatched(self, paths: List[str]) -> List[str]:
        """Override patterns that match none of ``paths``."""
        return [p for p, _ in self.overrides if not any(path_matches(p, q) for q in paths)]

    def to_dict(self) -> dict:
        d = self.defaults
        return {"version": self.version, "name": self.name,
                "defaults": {"input": d.input.to_dict(), "weight": d.weight.to_dict(),
                             "output": d.output.to_dict() if d.output else None},
                "ops": {k: dict(v) for k, v in self.ops.items()},
                "overrides": {p: dict(v) for p, v in self.overrides},
                **({"schedule": self.schedule.to_dict()} if self.schedule is not None else {})}


def path_matches(pattern: str, path: str) -> bool:
    candidates = {path, re.sub(r"_\d+$", "", path)}
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return any(rx.fullmatch(c) for c in candidates)
    return any(fnmatch.fnmatchcase(c, pattern) for c in candidates)


def _apply(cfg: QConfig, value: Mapping[str, Any], where: str) -> QConfig:
    if not isinstance(value, Mapping):
        raise RecipeError(f"{where}: expected a mapping, got {type(value).__name__}")
    roles = {k: v for k, v in value.items() if k in _ROLES}
    flat = {k: v for k, v in value.items() if k not in _ROLES}
    unknown = sorted(set(flat) - _SPEC_KEYS)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; allowed: {list(_ROLES)} or {sorted(_SPEC_KEYS)}")
    new = {"input": cfg.input, "weight": cfg.weight, "output": cfg.output}
    try:
        if flat:
            new["input"] = QSpec.from_dict(flat, new["input"])
            if new["output"] is not None:
                new["output"] = QSpec.from_dict(flat, new["output"])
        for role, v in roles.items():
            if v is None:
                if role != "output":
                    raise RecipeError(f"{where}.{role}: only 'output' may be null (no float fallback)")
                new[role] = None
            elif not isinstance(v, Mapping):
                raise RecipeError(f"{where}.{role}: expected a mapping or null")
            else:
                base = new[role] if new[role] is not None else cfg.input.with_()
                new[role] = QSpec.from_dict(v, base, where=f"{role}.")
    except SpecError as e:
        raise RecipeError(f"{where}: {e}") from None
    return QConfig(**new)


def recipe_from_dict(d: Mapping[str, Any], source: str = "<dict>") -> Recipe:
    """Validate and build a recipe; errors name ``source`` and the field."""
    if not isinstance(d, Mapping):
        raise RecipeError(f"{source}: a recipe is a mapping")
    unknown = sorted(set(d) - _TOP_KEYS)
    if unknown:
        raise RecipeError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(_TOP_KEYS)}")
    if d.get("version") != RECIPE_VERSION:
        raise RecipeError(f"{source}: version: expected {RECIPE_VERSION}, got {d.get('version')!r}")
    defaults = _apply(QConfig(), d.get("defaults") or {}, f"{source}: defaults")
    ops = dict(d.get("ops") or {})
    for op, v in ops.items():
        if op not in OP_CLASSES:
            raise RecipeError(f"{source}: ops.{op}: unknown op type; known: {sorted(OP_CLASSES)}")
        _apply(defaults, v, f"{source}: ops.{op}")
    overrides = list((d.get("overrides") or {}).items())
    for pattern, v in overrides:
        if not isinstance(pattern, str) or not pattern:
            raise RecipeError(f"{source}: overrides: pattern {pattern!r} must be a non-empty string")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise RecipeError(f"{source}: overrides[{pattern!r}]: bad regex: {e}") from None
        _apply(defaults, v, f"{source}: overrides[{pattern!r}]")
    try:
        schedule = Schedule.from_dict(d["schedule"], source) if d.get("schedule") is not None else None
    except ScheduleError as e:
        raise RecipeError(str(e)) from None
    return Recipe(name=str(d.get("name", Path(source).stem)), defaults=defaults, ops=ops,
                  overrides=overrides, source=source, schedule=schedule)


def load_recipe(recipe: Union[str, Path, Mapping[str, Any], Recipe]) -> Recipe:
    """A Recipe from a Recipe, a dict, a YAML path, or a shipped name (``w8a8`` -> configs/quant)."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return recipe_from_dict(recipe)
    path = Path(recipe)
    if not path.suffix and not path.exists():
        path = RECIPE_DIR / f"{recipe}.yaml"
    if not path.is_file():
        raise RecipeError(f"{recipe}: no such recipe file (shipped: "
                          f"{sorted(p.stem for p in RECIPE_DIR.glob('*.yaml'))})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: invalid YAML: {e}") from None
    return recipe_from_dict(data, source=str(path))
