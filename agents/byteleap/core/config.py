"""Typed agent configuration: YAML file, environment overrides, precise errors.

An agent describes its configuration as :class:`ConfigStruct` subclasses (frozen, unknown keys
forbidden) and loads it with :func:`load_config`::

    cfg = load_config(Path("/etc/byteleap/worker.yaml"), WorkerConfig, env_prefix="BYTELEAP_WORKER")

Order of precedence: field defaults < the YAML file < environment variables.

Environment overrides are named ``<PREFIX>__<KEY>__<SUBKEY>...``, e.g.
``BYTELEAP_WORKER__MINER__URL=wss://miner:8443``. Keys are matched case-insensitively against the
schema's field names (keys of ``dict`` sections are lower-cased). A variable that names no key
is an error. Values are parsed by the type of the key they target:

* a string (or a string ``Literal``) is taken verbatim, so ``PASSWORD=0123`` stays a string;
* an int in decimal (``010`` is ten, not YAML 1.1's octal eight), a float with Python's ``float``
  (``1e-3`` works, which YAML 1.1 would leave a string), a bool from
  ``true/false/yes/no/on/off/1/0``;
* anything else (lists, sections, optional values) as a YAML scalar or flow collection:
  ``[a, b]``, ``{url: x}``, ``null``.

The YAML file is read with ``safe_load`` semantics; duplicate keys are an error, not "last wins".
Schemas should use plain ``str`` for paths (msgspec's strict mode has no ``Path`` conversion) and
``msgspec.field(default_factory=list)`` for list defaults.

Every problem raises :class:`ConfigError`, whose message names where the bad value came from (the
file or the environment variable) and the dotted key path, e.g.
``/etc/byteleap/worker.yaml: miner.url: expected str, got int``. Values under a key that
:func:`byteleap.core.logs.is_secret_key` flags (its name contains ``secret``, ``password``,
``passwd``, ``token`` or ``key``) are never echoed: the same rule the log redaction uses. (A
``__post_init__`` validator in a schema must not put secrets in its own error messages either.)
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec
import msgspec.inspect as mi
import yaml
from msgspec import Meta

from .logs import is_secret_key

__all__ = [
    "ConfigError",
    "ConfigStruct",
    "LogLevel",
    "LoggingConfig",
    "NonNegativeSeconds",
    "Port",
    "PositiveSeconds",
    "load_config",
]

T = TypeVar("T", bound=msgspec.Struct)

PositiveSeconds = Annotated[float, Meta(gt=0)]
"""A duration in seconds, > 0 (YAML ints are accepted)."""
NonNegativeSeconds = Annotated[float, Meta(ge=0)]
Port = Annotated[int, Meta(ge=1, le=65535)]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]

_NO_FILE: Final = "(no config file)"
_PathPart = str | int


class ConfigStruct(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Base class of configuration sections: immutable, unknown keys are errors."""


class LoggingConfig(ConfigStruct, frozen=True, kw_only=True):
    level: LogLevel = "info"


class ConfigError(Exception):
    """A configuration problem.

    ``source`` is the file path or ``"environment variable NAME"``; ``key_path`` the dotted key
    (``""`` for the whole document); ``line`` the 1-based line of a YAML syntax error.
    """

    def __init__(self, source: str, key_path: str, problem: str, *, line: int | None = None):
        where = f"{source}: {key_path}" if key_path else source
        super().__init__(f"{where}: {problem}")
        self.source = source
        self.key_path = key_path
        self.problem = problem
        self.line = line


def _dotted(path: tuple[_PathPart, ...]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _is_secret_path(path: tuple[_PathPart, ...]) -> bool:
    """Whether any key on ``path`` may hold a secret (then its values are not shown)."""
    return any(isinstance(part, str) and is_secret_key(part) for part in path)


# ------------------------------------------------------------------------------------------------
# YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[tuple[str, str]] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        key = (key_node.tag, key_node.value)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"duplicate key {key_node.value!r}",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_problem(exc: yaml.YAMLError) -> tuple[str, int | None]:
    """``("line L, column C: <problem>", L)`` without PyYAML's snippet (it could show a secret)."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return f"invalid YAML ({type(exc).__name__})", None
    text = exc.problem or exc.context or "syntax error"
    mark = exc.problem_mark or exc.context_mark
    context = exc.context_mark
    if exc.problem and exc.context:
        text += f" ({exc.context}"
        if context is not None and mark is not None and context.line != mark.line:
            text += f" that starts at line {context.line + 1}"
        text += ")"
    if mark is None:
        return f"invalid YAML: {text}", None
    return f"line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {text}", mark.line + 1


def _read_yaml(path: Path) -> dict[str, Any]:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, "", "file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, "", f"not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        problem, line = _yaml_problem(exc)
        raise ConfigError(source, "", problem, line=line) from None
    except RecursionError:
        raise ConfigError(source, "", "invalid YAML: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(source, "", f"top level must be a mapping, got {_kind(data)}")
    return data


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    return type(value).__name__


# ------------------------------------------------------------------------------------------------
# Schema walking


def _unwrap(t: mi.Type) -> mi.Type:
    """``Optional[X]`` / ``X | None`` -> X when exactly one non-None member remains."""
    if isinstance(t, mi.UnionType):
        members = [m for m in t.types if not isinstance(m, mi.NoneType)]
        if len(members) == 1:
            return _unwrap(members[0])
    if isinstance(t, mi.Metadata):
        return _unwrap(t.type)
    return t


def _type_at(t: mi.Type, path: tuple[_PathPart, ...]) -> mi.Type | None:
    for part in path:
        t = _unwrap(t)
        if isinstance(t, mi.StructType) and isinstance(part, str):
            field = next((f for f in t.fields if f.encode_name == part), None)
            if field is None:
                return None
            t = field.type
        elif isinstance(t, mi.DictType):
            t = t.value_type
        elif isinstance(t, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
            t = t.item_type
        else:
            return None
    return _unwrap(t)


def _takes_raw_string(t: mi.Type) -> bool:
    t = _unwrap(t)
    if isinstance(t, mi.StrType):
        return True
    return isinstance(t, mi.LiteralType) and all(isinstance(v, str) for v in t.values)


def _unknown_key(
    source: str, path: tuple[_PathPart, ...], key: object, allowed: list[str]
) -> ConfigError:
    problem = f"unknown key {key!r}"
    close = difflib.get_close_matches(str(key), allowed, n=1)
    if close:
        problem += f" (did you mean {close[0]!r}?)"
    problem += f"; allowed keys: {', '.join(sorted(allowed)) or '(none)'}"
    return ConfigError(source, _dotted((*path, str(key))), problem)


def _check_keys(
    value: Any,
    t: mi.Type,
    path: tuple[_PathPart, ...],
    source_of: Callable[[tuple[_PathPart, ...]], str],
) -> None:
    """Report unknown keys anywhere in ``value`` against the schema, with their full path."""
    t = _unwrap(t)
    if isinstance(t, mi.StructType) and isinstance(value, dict):
        fields = {f.encode_name: f for f in t.fields}
        for key, sub in value.items():
            if not isinstance(key, str) or key not in fields:
                raise _unknown_key(source_of((*path, str(key))), path, key, list(fields))
            _check_keys(sub, fields[key].type, (*path, key), source_of)
    elif isinstance(t, mi.DictType) and isinstance(value, dict):
        for key, sub in value.items():
            _check_keys(sub, t.value_type, (*path, str(key)), source_of)
    elif isinstance(t, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType) and (
        isinstance(value, list)
    ):
        for index, item in enumerate(value):
            _check_keys(item, t.item_type, (*path, index), source_of)


# ------------------------------------------------------------------------------------------------
# Environment


def _resolve_env_key(
    root: mi.StructType, parts: list[str], source: str
) -> tuple[tuple[str, ...], mi.Type]:
    path: tuple[str, ...] = ()
    t: mi.Type = root
    for raw in parts:
        part = raw.lower()
        t = _unwrap(t)
        if isinstance(t, mi.StructType):
            fields = {f.encode_name.lower(): f for f in t.fields}
            field = fields.get(part)
            if field is None:
                raise _unknown_key(source, path, part, [f.encode_name for f in t.fields])
            path = (*path, field.encode_name)
            t = field.type
        elif isinstance(t, mi.DictType):
            path = (*path, part)
            t = t.value_type
        else:
            where = _dotted(path)
            raise ConfigError(source, _dotted((*path, part)), f"{where} is not a section")
    return path, t


_INT_TEXT: Final = re.compile(r"[+-]?[0-9]+")
_BOOL_TEXT: Final = {
    "true": True, "yes": True, "on": True, "1": True,
    "false": False, "no": False, "off": False, "0": False,
}  # fmt: skip


def _parse_env_value(raw: str, t: mi.Type, source: str, key_path: str) -> Any:
    """The value of an override, parsed by the type it targets, else as YAML."""
    if _takes_raw_string(t):
        return raw
    target = _unwrap(t)
    text = raw.strip()
    if isinstance(target, mi.IntType) and _INT_TEXT.fullmatch(text):
        return int(text)  # always decimal (YAML 1.1 would read 010 as octal)
    if isinstance(target, mi.FloatType):
        try:
            return float(text)  # also 1e-5, which YAML 1.1 reads as a string
        except ValueError:
            pass
    if isinstance(target, mi.BoolType) and text.lower() in _BOOL_TEXT:
        return _BOOL_TEXT[text.lower()]
    try:
        return yaml.load(raw, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        problem, _ = _yaml_problem(exc)
        raise ConfigError(source, key_path, f"value: {problem}") from None


def _apply(
    data: dict[str, Any], path: tuple[str, ...], value: Any, source: str, file_source: str
) -> None:
    node = data
    for depth, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            key_path = _dotted(path[: depth + 1])
            raise ConfigError(
                source,
                _dotted(path),
                f"cannot override: {file_source} sets {key_path} to a {_kind(child)}",
            )
        node = child
    node[path[-1]] = value


def _env_prefix(prefix: str) -> str:
    stripped = prefix.rstrip("_")
    if not stripped:
        raise ValueError("env_prefix must not be empty")
    return stripped + "__"


# ------------------------------------------------------------------------------------------------
# Conversion errors

_AT = re.compile(r"^(?P<text>.*?)(?: - at `(?P<path>\$[^`]*)`)?$", re.S)
_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]|\[\.\.\.\]")
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`$")


def _parse_msgspec_path(text: str) -> tuple[_PathPart, ...]:
    parts: list[_PathPart] = []
    for match in _PART.finditer(text[1:]):
        name, index = match.groups()
        if name is not None:
            parts.append(name)
        elif index is not None:
            parts.append(int(index))
        else:
            parts.append("...")
    return tuple(parts)


def _describe(t: mi.Type | None) -> str | None:
    if isinstance(t, mi.LiteralType):
        return "one of " + ", ".join(repr(v) for v in t.values)
    if isinstance(t, mi.EnumType):
        return "one of " + ", ".join(repr(m.value) for m in t.cls)
    return None


_MISSING_VALUE: Final = object()
_QUOTED: Final = re.compile(r"`([^`]*)`")
_JSON_NAMES: Final = {"array": "list", "object": "mapping"}


def _yaml_type_names(text: str) -> str:
    """msgspec names types in JSON terms (`array`, `object`); say list and mapping."""

    def rename(match: re.Match[str]) -> str:
        return re.sub(r"\b(array|object)\b", lambda m: _JSON_NAMES[m.group(1)], match.group(1))

    return _QUOTED.sub(rename, text)


def _value_at(data: Any, path: tuple[_PathPart, ...]) -> Any:
    for part in path:
        in_dict = isinstance(data, dict) and part in data
        in_list = isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data)
        if not (in_dict or in_list):
            return _MISSING_VALUE
        data = data[part]
    return data


def _short_repr(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _conversion_error(
    exc: msgspec.ValidationError,
    data: dict[str, Any],
    info: mi.StructType,
    source_of: Callable[[tuple[_PathPart, ...]], str],
) -> ConfigError:
    match = _AT.match(str(exc))
    assert match is not None  # the pattern matches any string
    text = match.group("text")
    path = _parse_msgspec_path(match.group("path") or "$")
    missing = _MISSING.match(text)
    if missing:
        path = (*path, missing.group("field"))
        problem = "required key is missing"
    elif text.startswith("Invalid enum value"):
        expected = _describe(_type_at(info, path))
        problem = f"expected {expected}" if expected else "invalid value"
        if not _is_secret_path(path):
            problem += f", got {text.removeprefix('Invalid enum value ')}"
    elif text.startswith("Expected "):  # msgspec never shows the value in these
        problem = "expected " + _yaml_type_names(text.removeprefix("Expected "))
        found = _value_at(data, path)
        if ", got " not in problem and found is not _MISSING_VALUE and not _is_secret_path(path):
            problem += f", got {_short_repr(found)}"
    elif _is_secret_path(path):
        problem = "invalid value (not shown: the key holds a secret)"
    else:
        problem = (text[:1].lower() + text[1:]).replace("`", "") if text else "invalid value"
    return ConfigError(source_of(path), _dotted(path), problem)


# ------------------------------------------------------------------------------------------------


def load_config(
    path: Path | None,
    schema: type[T],
    *,
    env_prefix: str,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Load ``schema`` from the YAML file at ``path`` (``None``: defaults only), then apply
    ``<env_prefix>__KEY__SUBKEY`` variables from ``environ`` (default ``os.environ``).

    Raises :class:`ConfigError` for every problem in the file or the environment.
    """
    info = mi.type_info(schema)
    if not isinstance(info, mi.StructType):
        raise TypeError(f"schema must be a msgspec Struct type, got {schema!r}")
    file_source = str(path) if path is not None else _NO_FILE
    data: dict[str, Any] = _read_yaml(path) if path is not None else {}

    head = _env_prefix(env_prefix)
    env = os.environ if environ is None else environ
    overrides: list[tuple[tuple[str, ...], str]] = []
    for name in sorted(env):
        if not name.startswith(head):
            continue
        source = f"environment variable {name}"
        parts = name[len(head) :].split("__")
        if not all(parts):
            raise ConfigError(source, "", f"malformed name: expected {head}KEY[__SUBKEY...]")
        key_path, leaf = _resolve_env_key(info, parts, source)
        value = _parse_env_value(env[name], leaf, source, _dotted(key_path))
        _apply(data, key_path, value, source, file_source)
        overrides.append((key_path, source))

    def source_of(key_path: tuple[_PathPart, ...]) -> str:
        for prefix, source in reversed(overrides):
            if key_path[: len(prefix)] == prefix:
                return source
        return file_source

    _check_keys(data, info, (), source_of)
    try:
        return msgspec.convert(data, schema, strict=True)
    except msgspec.ValidationError as exc:
        raise _conversion_error(exc, data, info, source_of) from None
