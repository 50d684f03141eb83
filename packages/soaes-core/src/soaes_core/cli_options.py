"""Command-line options and `--set KEY=VALUE` overrides generated from a config dataclass: define a setting once.

A setting's name, type, default and help text live on the dataclass field (`metadata={"help": ...}`), as in
TRL's configs and transformers' `HfArgumentParser`. `config_options(Cls)` turns the fields into click options
(one per scalar or list field: bools as ``--flag/--no-flag``, lists as comma-separated values that a repeated option
adds to, nested configs reachable through ``--set``) plus ``--config FILE.yaml`` and ``--set``, and hands the
command one built `Cls`. Values given on the command line go through the same conversion as YAML configs
(`soaes_core.config`), so a bad value is one `ConfigError` naming the option, e.g.
``--num-speculative-tokens[1]: expected int, got str 'abc'``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import click

from .config import _convert, _Err, _safe_load_bounded, _type_name, apply_overrides, from_dict, load_yaml, to_dict
from .errors import ConfigError

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_LIST_ORIGINS = (list, tuple, set, frozenset)
_FIRST_SENTENCE = re.compile(r"(?<=[\w)])\.\s+(?=[A-Z`])")  # a listing shows each help's first sentence


def field_help(f: dataclasses.Field[Any]) -> str:
    """The help text stored on a dataclass field (`metadata={"help": ...}`), or ''."""
    return str(f.metadata.get("help", "")).strip()


def field_default(f: dataclasses.Field[Any]) -> Any:
    """The field's default value (calling its `default_factory`), or `dataclasses.MISSING` when required."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def format_default(value: Any) -> str:
    """A default as a user would type it: lists comma-separated, None as 'none'."""
    value = to_dict(value)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(format_default(v) for v in value) or "(empty)"
    return str(value) if value != "" else '""'


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) is typing.Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _strip_optional(args[0])
    return tp


def _is_list(tp: Any) -> bool:
    tp = _strip_optional(tp)
    return get_origin(tp) in _LIST_ORIGINS or tp in (list, tuple)


def _is_nested(tp: Any) -> bool:
    """Fields that get no option of their own (nested configs and mappings): set them with --set or a file."""
    tp = _strip_optional(tp)
    if dataclasses.is_dataclass(tp) or get_origin(tp) is dict or tp is dict:
        return True
    if _is_list(tp):
        args = get_args(tp)
        return bool(args) and dataclasses.is_dataclass(_strip_optional(args[0]))
    return False


def parse_value(text: str, tp: Any, where: str) -> Any:
    """Convert command-line `text` to type `tp` by the YAML-config rules; `ConfigError` naming `where` if it can't.

    Lists take comma-separated items (``1,2,3``) or a YAML flow list (``[1, 2, 3]``); other values are taken
    as the string itself when the type accepts a string, else parsed as a YAML scalar (``true``, ``3``, ``null``).
    """
    try:
        if _is_list(tp) and not text.lstrip().startswith("["):
            items = [item.strip() for item in text.split(",")]
            if any(not item for item in items) and text.strip():
                raise _Err(where, f"empty item in comma-separated list {text!r}")
            item_tp = (get_args(_strip_optional(tp)) or (Any,))[0]
            values = [_parse_scalar(item, item_tp, f"{where}[{i}]") for i, item in enumerate(items) if item]
            return _convert(values, tp, where)
        return _parse_scalar(text, tp, where)
    except _Err as err:
        raise ConfigError(f"{err.path}: {err.message}") from None


def _parse_scalar(text: str, tp: Any, where: str) -> Any:
    if _strip_optional(tp) is Any:  # no declared type (a free mapping value): read it as YAML, as a config file would
        return _safe_load_bounded(text, where)
    try:
        return _convert(text, tp, where)
    except _Err as first:
        try:
            parsed = _safe_load_bounded(text, where)
        except Exception:  # not YAML either: the string's own error is the clearer one
            raise first from None
        if isinstance(parsed, str) and parsed == text:
            raise
        return _convert(parsed, tp, where)


class FieldType(click.ParamType):
    """click type converting an option's text to a dataclass field's type (see `parse_value`)."""

    def __init__(self, tp: Any, option: str) -> None:
        self.tp, self.option = tp, option
        inner = _strip_optional(tp)
        if get_origin(inner) is Literal:
            self.name = "|".join(str(c) for c in get_args(inner))
        elif _is_list(inner):
            self.name = f"{_type_name((get_args(inner) or (str,))[0])},..."
        else:
            self.name = _type_name(inner)

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str | None:
        inner = _strip_optional(self.tp)
        return f"[{'|'.join(str(c) for c in get_args(inner))}]" if get_origin(inner) is Literal else None

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        # a ConfigError (not click's BadParameter) so that SoaesGroup reports it as one `error:` line
        return parse_value(value, self.tp, self.option)


def resolve_key(cls: type, dotted: str, where: str = "--set") -> Any:
    """Type of the (nested) field `dotted` of dataclass `cls`; `ConfigError` with a did-you-mean if there is none.

    Keys below a mapping field (``tags.x``) are free; their type is the mapping's value type."""
    tp: Any = cls
    path: list[str] = []
    for part in dotted.split("."):
        inner = _strip_optional(tp)
        if get_origin(inner) is dict or inner is dict:
            tp = (get_args(inner) or (Any, Any))[1]
        elif dataclasses.is_dataclass(inner) and isinstance(inner, type):
            names = [f.name for f in dataclasses.fields(inner) if f.init]
            if part not in names:
                hint = difflib.get_close_matches(part, names, n=1, cutoff=0.6)
                prefix = ".".join(path)
                extra = (f" (did you mean {'.'.join([*path, hint[0]])!r}?)" if hint
                         else f" (known{' under ' + prefix if prefix else ''}: {', '.join(names)})")
                raise ConfigError(f"{where} {dotted}: unknown key{extra}")
            tp = get_type_hints(inner)[part]
        else:
            raise ConfigError(f"{where} {dotted}: {'.'.join(path)} is a {_type_name(inner)}, not a section")
        path.append(part)
    return tp


def parse_set_pairs(pairs: Iterable[str], cls: type | None = None, where: str = "--set") -> dict[str, Any]:
    """``KEY=VALUE`` strings → {dotted key: value}. With `cls`, keys are checked against its fields and values
    converted to the field's type; without, values stay strings (parsed as YAML by `apply_overrides`)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{where}: expected KEY=VALUE, got {pair!r}")
        out[key] = text if cls is None else parse_value(text, resolve_key(cls, key, where), f"{where} {key}")
    return out


def settable_keys(cls: type, prefix: str = "") -> list[tuple[str, Any, dataclasses.Field[Any]]]:
    """(dotted key, type, field) of every leaf field of `cls`, nested configs included (what --set accepts)."""
    out = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            out.extend(settable_keys(tp, f"{prefix}{f.name}."))
        else:
            out.append((f"{prefix}{f.name}", hints[f.name], f))
    return out


def key_rows(cls: type, prefix: str = "", exclude: Iterable[str] = ()) -> list[tuple[str, str]]:
    """(key, "type, default: first line of help") for every key `--set` accepts for `cls`, for a help listing."""
    skip = set(exclude)
    rows = []
    for key, tp, f in settable_keys(cls, prefix):
        if key[len(prefix):] in skip:
            continue
        default = field_default(f)
        shown = "required" if default is dataclasses.MISSING else f"default {format_default(default)}"
        text = _FIRST_SENTENCE.split(field_help(f).split("\n")[0])[0].rstrip(".")
        rows.append((key, f"{_type_name(_strip_optional(tp))}, {shown}" + (f": {text}" if text else "")))
    return rows


class KeysHelpCommand(click.Command):
    """click command whose --help ends with the keys `--set` accepts, read from dataclasses only when help is
    shown (so that starting the CLI does not import heavy config modules).

    `set_keys()` returns sections: (title, cls, key prefix, keys to leave out)."""

    def __init__(self, *args: Any, set_keys: Callable[[], Sequence[tuple[str, type, str, Sequence[str]]]],
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.set_keys = set_keys

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        for title, cls, prefix, exclude in self.set_keys():
            with formatter.section(title):
                formatter.write_dl(key_rows(cls, prefix, exclude))


def _option_help(f: dataclasses.Field[Any]) -> str:
    default = field_default(f)
    shown = "" if default is dataclasses.MISSING else f" (default: {format_default(default)})"
    return field_help(f) + shown


def _joined(value: Any) -> Any:
    """A repeatable (list) option's occurrences as one list, None when not given; other values unchanged."""
    if isinstance(value, tuple):
        return [item for part in value for item in part] if value else None
    return value


def build_config(cls: type[T], config_path: str | None = None, values: Mapping[str, Any] | None = None,
                 sets: Sequence[str] = (), source: str = "command line") -> T:
    """`cls` from an optional YAML file, then option values (None = not given), then ``--set`` pairs."""
    overrides = {k: v for k, v in (values or {}).items() if v is not None}
    overrides.update(parse_set_pairs(sets, cls))
    # the values are converted to their fields' types already: a string such as '000' must not be read as YAML again
    data = (load_yaml(config_path) or {}) if config_path else {}
    if overrides:
        data = apply_overrides(data, overrides, parse_strings=False)
    return from_dict(cls, data, source=str(config_path) if config_path else source)


def config_options(cls: type, *, names: Mapping[str, Sequence[str]] | None = None, exclude: Iterable[str] = (),
                   param: str = "config", config_file: bool = True, set_option: bool = True) -> Callable[[F], F]:
    """Decorator for a click command: one option per field of dataclass `cls`, ``--config`` and ``--set``.

    The command receives the built `cls` as keyword `param` instead of the individual options. An option is
    named after its field (``max_new_tokens`` → ``--max-new-tokens``) unless `names` gives its declarations
    (``{"num_speculative_tokens": ("-n", "--num-speculative-tokens")}``, ``{"do_sample": ("--do-sample/--greedy",)}``).
    A field added to `cls` appears in the command's options, ``--help`` and ``--set`` with no other edit.
    """
    names = dict(names or {})
    skip = set(exclude)
    hints = get_type_hints(cls)
    options: list[Callable[[Any], Any]] = []
    generated: list[str] = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip or _is_nested(hints[f.name]):
            continue
        tp = hints[f.name]
        decls = list(names.get(f.name, ()))
        if _strip_optional(tp) is bool:
            decls = decls or [f"--{f.name.replace('_', '-')}/--no-{f.name.replace('_', '-')}"]
            options.append(click.option(*decls, f.name, default=None, help=_option_help(f)))
        else:
            decls = decls or [f"--{f.name.replace('_', '-')}"]
            long = next((d for d in decls if d.startswith("--")), decls[0])
            # a list option may be repeated (each occurrence adds its items): a repeat is never silently dropped
            options.append(click.option(*decls, f.name, type=FieldType(tp, long), default=None,
                                        multiple=_is_list(tp), help=_option_help(f)))
        generated.append(f.name)
    if set_option:
        options.append(click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                                    help=f"Set any {cls.__name__} field by name (dotted for nested ones); repeatable."))
    if config_file:
        options.append(click.option("--config", "config_path", type=click.Path(dir_okay=False),
                                    help=f"YAML {cls.__name__}; options given on the command line override it."))

    def decorator(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {name: _joined(kwargs.pop(name)) for name in generated}
            sets = kwargs.pop("sets", ()) if set_option else ()
            config_path = kwargs.pop("config_path", None) if config_file else None
            kwargs[param] = build_config(cls, config_path, values, sets)
            return func(*args, **kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return typing.cast(F, wrapper)

    return decorator


def recipe_argument(func: Callable[..., Any]) -> Callable[..., Any]:
    """An optional positional RECIPE.yaml standing for `--config` (the file the generated options override)."""
    @functools.wraps(func)
    def wrapper(*args: Any, recipe: str | None = None, config_path: str | None = None, **kwargs: Any) -> Any:
        if recipe and config_path:
            raise ConfigError(f"give the recipe once: RECIPE ({recipe}) or --config ({config_path})")
        return func(*args, config_path=recipe or config_path, **kwargs)

    return click.argument("recipe", required=False, type=click.Path(exists=True, dir_okay=False))(wrapper)
