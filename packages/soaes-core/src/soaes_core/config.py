"""YAML → dataclass configs, with errors that name the file, the field path and the problem.

`load_config(path, MyConfig)` reads YAML and builds `MyConfig`, checking every key against the dataclass:
unknown keys get a did-you-mean, wrong types and missing required fields are reported as
``recipe.yaml: train.lr: expected float, got str 'abc'``.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import ConfigError

T = TypeVar("T")

_MISSING = dataclasses.MISSING


# Bounds on what a config file may cost to read: configs are small, so anything past these is a mistake or an
# attack (a "billion laughs" YAML of nested aliases is a few hundred bytes and expands to billions of nodes).
MAX_CONFIG_BYTES = 8 * 1024 * 1024
MAX_CONFIG_NODES = 1_000_000

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 50
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4
_REPR.maxlevel = 2


def _describe(value: Any) -> str:
    """Type and a short repr of `value`, in bounded time and size whatever its size or depth."""
    text = _REPR.repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


class _Err(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path, self.message = path, message


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _convert(value: Any, tp: Any, path: str) -> Any:
    if tp is Any or tp is object:
        return value
    origin = get_origin(tp)
    if origin is typing.Annotated:
        return _convert(value, get_args(tp)[0], path)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except _Err as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise _Err(path, f"expected {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        choices = get_args(tp)
        if value in choices and not (isinstance(value, bool) and not any(isinstance(c, bool) for c in choices)):
            return value
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise _Err(path, f"expected one of {', '.join(repr(c) for c in choices)}, got {value!r}{extra}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build(tp, value, path)
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Err(path, f"expected a list, got {_describe(value)}")
        args = get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise _Err(path, f"expected a list of {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, _join(path, i)) for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, _join(path, i)) for i, v in enumerate(value)]
        if origin is tuple:
            return tuple(items)
        if origin in (set, frozenset):
            return origin(items)
        return items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Err(path, f"expected a mapping, got {_describe(value)}")
        args = get_args(tp)
        k_tp, v_tp = args if args else (Any, Any)
        return {_convert(k, k_tp, path): _convert(v, v_tp, _join(path, str(k))) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Err(path, f"expected bool (true/false), got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Err(path, f"expected int, got {_describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string; accept numeric strings
            try:
                return float(value)
            except ValueError:
                pass
        raise _Err(path, f"expected float, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Err(path, f"expected str, got {_describe(value)}")
    if tp in (Path, os.PathLike) or (isinstance(tp, type) and issubclass(tp, Path)):
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _Err(path, f"expected a path string, got {_describe(value)}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member.value or value == member.name:
                return member
        raise _Err(path, f"expected one of {', '.join(repr(m.value) for m in tp)}, got {value!r}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Err(path, f"expected {_type_name(tp)}, got {_describe(value)}")
    return value


def _build(cls: type[T], data: Any, path: str) -> T:
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _Err(path or "<root>", f"expected a mapping for {cls.__name__}, got {_describe(data)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            extra = f" (did you mean {hint[0]!r}?)" if hint else f" (known: {', '.join(sorted(fields))})"
            raise _Err(_join(path, str(key)), f"unknown key{extra}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], _join(path, name))
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise _Err(_join(path, name), f"missing required field ({_type_name(hints[name])})")
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError) as err:  # __post_init__ validation
        raise _Err(path, str(err)) from None
    return obj


def from_dict(cls: type[T], data: Any, source: str = "<config>") -> T:
    """Build dataclass `cls` from a plain mapping, raising `ConfigError` naming `source` and the field."""
    try:
        return _build(cls, data, "")
    except _Err as err:
        where = f"{source}: {err.path}: " if err.path else f"{source}: "
        raise ConfigError(where + err.message) from None


def _expanded_size(node: yaml.Node, source: str) -> int:
    """Nodes in `node` once every alias is expanded, computed on the composed graph (each node visited once).

    Raises ConfigError past MAX_CONFIG_NODES, or for a recursive alias (a collection that contains itself)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(node, False)]
    while stack:
        current, done = stack.pop()
        key = id(current)
        if done:
            children = _children(current)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            active.discard(key)
            if sizes[key] > MAX_CONFIG_NODES:
                raise ConfigError(f"{source}: YAML expands to more than {MAX_CONFIG_NODES} values once its "
                                  "aliases are expanded; refusing to load it (an alias bomb, or data that belongs "
                                  "in a data file)")
            continue
        if key in sizes:
            continue
        if key in active:
            raise ConfigError(f"{source}: YAML has a recursive alias (a collection that contains itself)")
        active.add(key)
        stack.append((current, True))
        stack.extend((c, False) for c in _children(current) if id(c) not in sizes)
    return sizes[id(node)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _safe_load_bounded(text: str, source: str) -> Any:
    """`yaml.safe_load`, refusing documents whose aliases expand past MAX_CONFIG_NODES before building them."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_yaml(path: str | os.PathLike[str]) -> Any:
    """Parse a YAML file, with a one-line `ConfigError` for a missing file or a syntax error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config file is {size} bytes, more than the {MAX_CONFIG_BYTES} allowed")
    try:
        with open(path, encoding="utf-8") as fh:
            return _safe_load_bounded(fh.read(MAX_CONFIG_BYTES + 1), str(path))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason})") from None


def load_config(path: str | os.PathLike[str], cls: type[T], overrides: dict[str, Any] | None = None) -> T:
    """Load YAML at `path` into dataclass `cls`; `overrides` are dotted keys (``{"train.lr": 1e-5}``)."""
    data = load_yaml(path) or {}
    if overrides:
        data = apply_overrides(data, overrides)
    return from_dict(cls, data, source=str(path))


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any], parse_strings: bool = True) -> dict[str, Any]:
    """Return a copy of `data` with dotted-key overrides applied (string values parsed as YAML scalars unless
    `parse_strings` is False: values already converted to their field's type stay as they are)."""
    import copy

    out = copy.deepcopy(data)
    for dotted, value in overrides.items():
        if parse_strings and isinstance(value, str):
            value = yaml.safe_load(value)
        node = out
        keys = dotted.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted}: {k} is not a mapping")
        node[keys[-1]] = value
    return out


# Field metadata key: leave the field out of `to_dict` while it holds its default. For settings passed through
# from another library (e.g. every `TrainingArguments` field), so that dumps, manifests and fingerprints list
# what was chosen, and do not change when that library adds a setting.
OMIT_IF_DEFAULT = "omit_if_default"


def _is_default(f: dataclasses.Field[Any], value: Any) -> bool:
    if f.default is not _MISSING:
        return bool(value == f.default)
    if f.default_factory is not _MISSING:
        return bool(value == f.default_factory())
    return False


def to_dict(obj: Any) -> Any:
    """Dataclass (nested) → plain YAML/JSON-able structure (Paths and Enums as strings)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not (f.metadata.get(OMIT_IF_DEFAULT) and _is_default(f, getattr(obj, f.name)))}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


def dump_config(obj: Any) -> str:
    """Dataclass → YAML text (round-trips through `from_dict`)."""
    return yaml.safe_dump(to_dict(obj), allow_unicode=True, sort_keys=False)
