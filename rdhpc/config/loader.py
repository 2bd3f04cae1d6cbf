"""Load a RunConfig from YAML plus `--set section.key=value` overrides, validating everything at once.

Every problem found (unknown keys with a "did you mean", wrong types, inconsistent values) is
collected into one ConfigError; the command line prints them all and exits with status 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from rdhpc.config.schema import CHANGED_MEANING, MOVED_KEYS, SECTION_NAMES, RunConfig
from rdhpc.errors import ConfigError  # noqa: F401  (defined there, re-exported here)
from rdhpc.model.config import MODEL_SIZES

CONFIG_FILE_NAME = "config.yaml"


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, key: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return the converted value (or None on error)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(value, inner[0], key, problems)
        for option in inner:  # e.g. `bool | str`: the first type that takes the value
            attempt: list[str] = []
            converted = _convert(value, option, key, attempt)
            if not attempt:
                return converted
        problems.append(f"{key}: expected {' or '.join(_type_name(a) for a in inner)}, "
                        f"got {type(value).__name__} {value!r}")
        return None
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            # PyYAML follows YAML 1.1, which reads `1e-3` (no dot) as a string: accept it as a number.
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if math.isfinite(number):
                return number
            problems.append(f"{key}: must be a finite number, got {value!r}")
            return None
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is dict:
        key_type, value_type = typing.get_args(tp)
        if isinstance(value, dict):
            before = len(problems)
            items = {_convert(k, key_type, f"{key} key {k!r}", problems): _convert(v, value_type, f"{key}.{k}", problems)
                     for k, v in value.items()}
            return None if len(problems) > before else items
    elif origin in (list, tuple):
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
                problems.append(f"{key}: expected a list of {len(args)} values, got {len(value)}")
                return None
            before = len(problems)
            item_types = args if origin is tuple and args[-1] is not Ellipsis else [args[0]] * len(value)
            items = [_convert(v, t, f"{key}[{i}]", problems) for i, (v, t) in enumerate(zip(value, item_types))]
            if len(problems) > before:
                return None
            return tuple(items) if origin is tuple else items
    elif dataclasses.is_dataclass(tp):  # an item of a list of sections (data.sources)
        if isinstance(value, dict):
            before = len(problems)
            built = build_section(tp, value, key, problems)
            return None if len(problems) > before else built
    else:
        raise TypeError(f"unsupported config annotation {tp!r} for {key}")
    problems.append(f"{key}: expected {_type_name(tp) if origin is None else str(tp).replace('typing.', '')}, "
                    f"got {type(value).__name__} {value!r}")
    return None


def build_section(cls, values: dict, prefix: str, problems: list[str], moved: dict | None = None):
    """A dataclass from a mapping: every key known and of its annotated type, else a problem naming
    `prefix.key` (a dataclass-typed field is a nested section). `moved`: full keys that moved, with
    their new place. Fields with a problem keep their defaults."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            new_place = (moved or {}).get(name)
            problems.append(f"{name}: moved to {new_place}" if new_place else
                            f"{name}: unknown key{_did_you_mean(str(key), fields)}")
            continue
        before = len(problems)
        if dataclasses.is_dataclass(hints[key]):
            if isinstance(value, dict):
                converted = build_section(hints[key], value, name, problems, moved)
            else:
                problems.append(f"{name}: a section must be a mapping of keys, got {type(value).__name__}")
        else:
            converted = _convert(value, hints[key], name, problems)
        if len(problems) == before:
            kwargs[key] = converted
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'model.mean_recurrence=16' -> (['model', 'mean_recurrence'], 16); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError([f"--set {text!r}: expected section.key=value"])
    key, _, raw = text.partition("=")
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise ConfigError([f"--set {text!r}: the key must be section.key (e.g. model.mean_recurrence)"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError([f"--set {text!r}: value is not valid YAML ({exc})"]) from None
    return path, value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: no such config file"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the config as UTF-8"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from None
    if data is None:
        # an empty file would silently mean the 3.5B defaults: almost certainly not what was meant
        raise ConfigError([f"{path}: the config file is empty; it would train the defaults (the 3.5B model). "
                           f"Set at least `model: {{size: ...}}`, or pass the defaults on purpose with a file "
                           f"holding `model: {{size: huginn-3.5b}}`"])
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections, got {type(data).__name__}"])
    return data


def _migrate_moved_keys(raw: dict) -> dict:
    """A config written by an earlier rdhpc (inside a checkpoint or an export): its moved keys are
    put where they live now. User configs are told instead (`train.val_interval: moved to ...`)."""
    out = {name: dict(values) if isinstance(values, dict) else values for name, values in raw.items()}
    for old, new in MOVED_KEYS.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(" ")[0].split(".")
        if isinstance(out.get(old_section), dict) and old_key in out[old_section]:
            value = out[old_section].pop(old_key)
            if old not in CHANGED_MEANING:
                out.setdefault(new_section, {})
                out[new_section].setdefault(new_key, value)
    return out


def config_from_dict(raw: dict, overrides: list[str] = (), source: str | None = None,
                     written_by_rdhpc: bool = False) -> RunConfig:
    """Build and validate a RunConfig; raise ConfigError listing every problem. `written_by_rdhpc`:
    a config saved by rdhpc itself (checkpoint, export), possibly by an earlier version."""
    problems: list[str] = []
    sections: dict[str, dict] = {}
    if written_by_rdhpc:
        raw = _migrate_moved_keys(raw)
    for name, values in raw.items():
        if name not in SECTION_NAMES:
            problems.append(f"{name}: unknown section{_did_you_mean(name, SECTION_NAMES)}")
        elif values is None:
            sections[name] = {}
        elif not isinstance(values, dict):
            problems.append(f"{name}: a section must be a mapping of keys, got {type(values).__name__}")
        else:
            sections[name] = dict(values)
    for text in overrides:
        try:
            (section, key), value = parse_override(text)
        except ConfigError as exc:
            problems += exc.problems
            continue
        if section not in SECTION_NAMES:
            problems.append(f"--set {text}: unknown section {section!r}{_did_you_mean(section, SECTION_NAMES)}")
            continue
        sections.setdefault(section, {})[key] = value

    # A named model size is the base; keys given next to it override it.
    model_values = sections.get("model", {})
    size = model_values.get("size")
    if size is not None:
        if isinstance(size, str) and size in MODEL_SIZES:
            model_values = {**MODEL_SIZES[size], **model_values}
        else:
            problems.append(f"model.size: unknown size {size!r}; choose one of {sorted(MODEL_SIZES)}"
                            f"{_did_you_mean(str(size), MODEL_SIZES)}")
            model_values = {k: v for k, v in model_values.items() if k != "size"}
    sections["model"] = model_values

    hints = typing.get_type_hints(RunConfig)
    built = {name: build_section(hints[name], sections.get(name, {}), name, problems, MOVED_KEYS)
             for name in SECTION_NAMES}
    config = RunConfig(**built)
    # Fields with a type error kept their defaults; value checks run on everything else, so one
    # run reports every problem, without a second message about a key already reported.
    already_reported = {p.split(":")[0].split("[")[0] for p in problems}
    problems += [p for p in config.problems() if p.split(":")[0] not in already_reported]
    if problems:
        raise ConfigError(problems, source)
    return config


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """YAML file (optional) -> defaults overridden by the file, then by `overrides`."""
    raw = read_yaml(path) if path is not None else {}
    return config_from_dict(raw, overrides, source=str(path) if path is not None else None)


def config_to_dict(config: RunConfig) -> dict:
    def plain(value):
        if isinstance(value, tuple):
            return list(value)
        return value
    return {name: {k: plain(v) for k, v in dataclasses.asdict(getattr(config, name)).items()}
            for name in SECTION_NAMES}


def config_to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def save_config(config: RunConfig, folder: str | Path) -> Path:
    """Write the resolved config as `folder/config.yaml` (atomically), e.g. next to a checkpoint."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG_FILE_NAME
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(config_to_yaml(config))
    tmp.replace(path)
    return path


def config_from_checkpoint(folder: str | Path) -> RunConfig:
    """The run config saved next to a checkpoint (by this rdhpc or an earlier one)."""
    path = Path(folder) / CONFIG_FILE_NAME
    return config_from_dict(read_yaml(path), source=str(path), written_by_rdhpc=True)
