"""YAML -> frozen dataclasses, with errors that name file, line and key.

Config, policy, API-key and test-case files are all edited by hand, so every
mistake must come back as one line a person can act on
(``config.yaml:12: server.port: expected an integer, got 'eighty'``), never a
traceback. PyYAML's node tree keeps line numbers; we walk it ourselves so each
value's location survives the conversion, substitute ``${ENV}`` in scalars,
and then build the target dataclass from its type hints.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar, Union, get_args, get_origin

import yaml

from .errors import ConfigError

T = TypeVar("T")

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True, slots=True)
class Source:
    """Where a parsed document came from: its file, and the line of every key path."""

    file: str
    lines: Mapping[str, int] = field(default_factory=dict)
    base_dir: Path = Path(".")

    def line(self, path: str) -> int | None:
        while True:
            if path in self.lines:
                return self.lines[path]
            if "." not in path and "[" not in path:
                return self.lines.get("")
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut]

    def error(self, path: str, message: str) -> ConfigError:
        return ConfigError(message, file=self.file, line=self.line(path), key=path or None)


@dataclass(frozen=True, slots=True)
class Section:
    """A mapping left untyped by its parent, built later by whoever owns its schema.

    Backends own their config (``models.X.backend``); the config loader keeps the
    raw mapping with its location so the backend's errors still name file and line.
    """

    data: Mapping[str, Any]
    path: str
    source: Source

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def build(self, cls: type[T]) -> T:
        return build(cls, self.data, self.path, self.source)


def substitute_env(text: str, *, where: str = "") -> str:
    """Replace ``${VAR}`` / ``${VAR:-default}``; an unset variable with no default is an error."""

    def repl(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        value = os.environ.get(name)
        if value is None:
            if default is None:
                raise ConfigError(f"environment variable {name} is not set{where}")
            return default
        return value

    return _ENV.sub(repl, text)


def load(path: str | os.PathLike[str], *, env: bool = True) -> tuple[Any, Source]:
    """Parse a YAML file into plain Python data plus a ``Source`` of line numbers."""
    p = Path(path)
    shown = str(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", file=shown) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, expected a file", file=shown) from None
    except UnicodeDecodeError:
        raise ConfigError("not valid UTF-8 text", file=shown) from None
    except OSError as exc:
        raise ConfigError(exc.strerror or str(exc), file=shown) from None
    return loads(text, file=shown, base_dir=p.resolve().parent, env=env)


def loads(text: str, *, file: str = "<string>", base_dir: Path | None = None, env: bool = True) -> tuple[Any, Source]:
    lines: dict[str, int] = {}
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"YAML syntax error: {problem}", file=file, line=line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML error: {exc}", file=file) from None
    finally:
        loader.dispose()
    source = Source(file=file, lines=lines, base_dir=base_dir or Path.cwd())
    if node is None:
        return None, source
    lines[""] = node.start_mark.line + 1
    return _convert(node, "", lines, source, env), source


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _convert(node: yaml.Node, path: str, lines: dict[str, int], source: Source, env: bool) -> Any:
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise ConfigError("YAML merge keys (<<) are not supported", file=source.file, line=key_node.start_mark.line + 1)
            key = _convert(key_node, path, lines, source, env=False)
            if isinstance(key, (list, dict)):
                raise ConfigError("a mapping key must be a scalar", file=source.file, line=key_node.start_mark.line + 1)
            child = _join(path, key)
            if key in out:
                raise ConfigError("duplicate key", file=source.file, line=key_node.start_mark.line + 1, key=child)
            lines[child] = key_node.start_mark.line + 1
            out[key] = _convert(value_node, child, lines, source, env)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            child = f"{path}[{i}]"
            lines[child] = item.start_mark.line + 1
            items.append(_convert(item, child, lines, source, env))
        return items
    assert isinstance(node, yaml.ScalarNode)
    value = node.value
    line = node.start_mark.line + 1
    tag = node.tag
    if env and "${" in value:
        whole = _ENV.fullmatch(value) is not None
        try:
            value = substitute_env(value)
        except ConfigError as exc:
            raise ConfigError(exc.reason, file=source.file, line=line, key=path or None) from None
        # re-resolve a plain scalar, or a quoted one that is only a reference ("${PORT:-8080}"),
        # so the substituted text gets its YAML type (an int); quoted literal text stays a string
        if node.style is None or whole:
            tag = yaml.SafeLoader.resolve(yaml.SafeLoader, yaml.ScalarNode, value, (True, False))  # type: ignore[arg-type]
    if tag == "tag:yaml.org,2002:str":
        return value
    constructor = yaml.SafeLoader("")
    try:
        return constructor.construct_object(yaml.ScalarNode(tag, value, node.start_mark, node.end_mark, node.style))
    except yaml.YAMLError as exc:
        raise ConfigError(f"bad value: {exc}", file=source.file, line=line, key=path or None) from None
    finally:
        constructor.dispose()


# ---------------------------------------------------------------------------
# typed construction


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
                "list": "a list", "dict": "a mapping", "Path": "a file path"}.get(tp.__name__, tp.__name__)
    origin = get_origin(tp)
    if origin in (list, tuple):
        return "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return str(tp)


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def build(cls: type[T], data: Any, path: str, source: Source) -> T:
    """Build ``cls`` (a dataclass or a typing form) from parsed YAML ``data``."""
    return _build(cls, data, path, source)


def _build(tp: Any, value: Any, path: str, source: Source) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _build(option, value, path, source)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise source.error(path, f"expected {' or '.join(_type_name(o) for o in options)}, got {_describe(value)}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise source.error(path, f"expected {_type_name(tp)}, got {_describe(value)}")
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise source.error(path, f"expected a list, got {_describe(value)}")
        (item_tp, *rest) = get_args(tp) or (Any,)
        items = [_build(item_tp, v, f"{path}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, dict):
            raise source.error(path, f"expected a mapping, got {_describe(value)}")
        args = get_args(tp)
        key_tp, val_tp = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            if key_tp is str and not isinstance(k, str):
                k = str(k)
            out[k] = _build(val_tp, v, _join(path, k), source)
        return out
    if tp is Section:
        if not isinstance(value, dict):
            raise source.error(path, f"expected a mapping, got {_describe(value)}")
        return Section(value, path, source)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise source.error(path, f"expected true or false, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise source.error(path, f"expected an integer, got {_describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise source.error(path, f"expected a number, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise source.error(path, f"expected a string, got {_describe(value)}")
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise source.error(path, f"expected a file path, got {_describe(value)}")
        p = Path(value).expanduser()
        return p if p.is_absolute() else (source.base_dir / p)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise source.error(path, f"expected {_type_name(tp)}, got {_describe(value)}")


def _build_dataclass(cls: Any, value: Any, path: str, source: Source) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise source.error(path, f"expected a mapping, got {_describe(value)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    names = {f.metadata.get("yaml", f.name): f.name for f in fields.values()}
    kwargs = {}
    for key, raw in value.items():
        child = _join(path, key)
        if key not in names:
            close = difflib.get_close_matches(str(key), list(names), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise source.error(child, f"unknown key{hint}")
        name = names[key]
        kwargs[name] = _build(hints[name], raw, child, source)
    for yaml_name, name in names.items():
        f = fields[name]
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise source.error(path, f"missing required key '{yaml_name}'")
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise source.error(path, str(exc)) from None
    check = getattr(obj, "validate", None)
    if callable(check):
        problem = check()
        if problem:
            key, message = problem if isinstance(problem, tuple) else ("", problem)
            raise source.error(_join(path, key) if key else path, message)
    return obj
