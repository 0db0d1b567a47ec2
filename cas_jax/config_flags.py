"""Command-line flags defined from a (nested) dataclass config, and the config built back.

    CONFIG = config_flags.define(PipelineConfig(), names={"train.lr": "lr"})
    ...
    cfg = CONFIG.value()  # once absl has parsed argv: a PipelineConfig

Every field of the config becomes one absl flag; a field whose value is a dataclass is a section
whose fields become flags in turn (unless its class has `parse`: then it is one value). A flag
is named by the field's dotted path (`train.lr`), after `prefix`, unless `names` maps that path
to another name (launchers keep their existing flat names, e.g. `--lr`); `sections` maps a
section's path to what its fields' names start with in place of that path ("" drops it: with
{"study.pipeline": ""}, `study.pipeline.train.lr` is `--train.lr`). Its default is the
field's value in the config passed in; its type comes from the field's annotation: bool, int,
float, str (an enum when `choices` lists its values or the annotation is a Literal), a tuple of
those (comma separated), a class with a `parse(str)` classmethod and a `str()` that `parse`
reads back (e.g. `attention.Geometry`), or any of these or None (written "none"). Help:
`helps[path]`, else the field's metadata "help", else the field's docstring (a string literal
below it), its trailing comment, or its "name: ..." entry in the class docstring, else the
bare path.

A value of the wrong type is refused by absl with an error naming the flag; a config that
refuses the values (its `__post_init__` raises ValueError) raises `ConfigError` naming the
flags set on its section.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from absl import flags

NONE = "none"
"""How an optional field's None is written on the command line."""


class ConfigError(ValueError):
    """The flags parsed, but the config refuses their values."""


class _Parser(flags.ArgumentParser):
    """str -> value with `convert`; values that are not strings (defaults) pass as they are."""

    def __init__(self, convert: Callable[[str], Any], type_name: str):
        self.convert, self.type_name = convert, type_name

    def parse(self, argument):
        if not isinstance(argument, str):
            return argument
        try:
            return self.convert(argument)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"expected {self.type_name} ({e})") from e

    def flag_type(self) -> str:
        return self.type_name


class _Serializer(flags.ArgumentSerializer):
    def serialize(self, value) -> str:
        return _text(value)


def _text(value) -> str:
    """How `value` is written on the command line (what the flag's parser reads back)."""
    if value is None:
        return NONE
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(_text(v) for v in value)
    return str(value)


def _scalar(kind) -> tuple[Callable[[str], Any], str]:
    if kind is bool:
        return (lambda s: {"true": True, "1": True, "false": False, "0": False}[s.lower()],
                "bool")
    if kind in (int, float, str):
        return kind, kind.__name__
    if isinstance(getattr(kind, "parse", None), Callable):
        return kind.parse, kind.__name__
    raise TypeError(f"no flag type for {kind!r}")


def _converter(hint) -> tuple[Callable[[str], Any], str]:
    """(str -> value, type name) for a field annotation (module doc)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1 or len(args) != 2:
            raise TypeError(f"no flag type for {hint!r}")
        convert, name = _converter(inner[0])
        return (lambda s: None if s.strip().lower() == NONE else convert(s)), f"{name} or none"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            items = [_scalar(args[0])]

            def convert(s):
                return tuple(items[0][0](p.strip()) for p in s.split(",") if p.strip())
            return convert, f"comma-separated {items[0][1]}s"
        items = [_scalar(a) for a in args]

        def convert_fixed(s):
            parts = [p.strip() for p in s.split(",")]
            if len(parts) != len(items):
                raise ValueError(f"{len(items)} comma-separated values, got {len(parts)}")
            return tuple(c(p) for (c, _), p in zip(items, parts))
        return convert_fixed, ",".join(n for _, n in items)
    return _scalar(hint)


def _field_docs(cls) -> dict[str, str]:
    """Help texts written beside a dataclass's fields: the string literal below a field, its
    trailing comment, or a "name: text" (also "a, b: text") entry of the class docstring."""
    docs: dict[str, str] = {}
    for entry in re.split(r"\n\s*\n|\n(?=\s*[\w, ]+: )|(?<=\.) (?=[a-z_]+(?:, [a-z_]+)*: )",
                          inspect.getdoc(cls) or ""):
        m = re.match(r"\s*([a-z_][\w, ]*?):\s+(.+)", entry, re.S)
        if m:
            for name in m.group(1).split(","):
                docs.setdefault(name.strip(), " ".join(m.group(2).split()))
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return docs
    comments = {tok.start[0]: tok.string.lstrip("# ").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    body = ast.parse(source).body[0].body
    for node, nxt in zip(body, body[1:] + [None]):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        if (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[name] = " ".join(nxt.value.value.split())
        elif node.end_lineno in comments:
            docs[name] = comments[node.end_lineno]
    return docs


@dataclasses.dataclass
class _Flag:
    path: str
    name: str


class ConfigFlags:
    """The flags `define` made for a config, and the config built back from their values."""

    def __init__(self, default, flag_list: list[_Flag], flag_values: flags.FlagValues):
        self.default, self.flag_values = default, flag_values
        self.names = {f.path: f.name for f in flag_list}
        """Field path -> flag name."""

    def value(self, flag_values: flags.FlagValues | None = None):
        """The config with every flag's parsed value in place of the default's. Raises
        ConfigError if a (section) config refuses them."""
        fv = self.flag_values if flag_values is None else flag_values
        return self._build(self.default, "", fv)

    def _build(self, obj, path: str, fv: flags.FlagValues):
        changes = {}
        for f in dataclasses.fields(obj):
            sub = f"{path}{f.name}"
            value = getattr(obj, f.name)
            if _is_section(value):
                changes[f.name] = self._build(value, sub + ".", fv)
            elif sub in self.names:
                changes[f.name] = fv[self.names[sub]].value
        try:
            return dataclasses.replace(obj, **changes)
        except ValueError as e:
            here = [n for p, n in self.names.items() if p.startswith(path)]
            named = [n for n in here if fv[n].present] or here
            raise ConfigError(f"{', '.join('--' + n for n in named)}: {e}") from e

    def argv(self, config) -> list[str]:
        """`--name=value` for every flag whose value in `config` differs from the default's
        (what reproduces `config` from this launcher's command line)."""
        out = []
        for path, name in self.names.items():
            value = _get(config, path)
            if value != _get(self.default, path):
                out.append(f"--{name}={_text(value)}")
        return out


def _is_section(value) -> bool:
    """A dataclass instance that is not itself a parsed value (it has no `parse`)."""
    return (dataclasses.is_dataclass(value) and not isinstance(value, type)
            and not hasattr(type(value), "parse"))


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def define(default, *, prefix: str = "", names: Mapping[str, str] | None = None,
           sections: Mapping[str, str] | None = None, helps: Mapping[str, str] | None = None,
           choices: Mapping[str, Sequence[str]] | None = None, skip: Iterable[str] = (),
           flag_values: flags.FlagValues = flags.FLAGS) -> ConfigFlags:
    """Defines a flag for every field of the dataclass instance `default` (module doc) in
    `flag_values`; fields whose dotted path is in `skip` (or lies under one) get none and keep
    `default`'s value. Returns what builds the config back from the parsed flags."""
    names, helps, choices, skip = dict(names or {}), dict(helps or {}), dict(choices or {}), \
        tuple(skip)
    sections = dict(sections or {})
    made: list[_Flag] = []
    walked: set[str] = set()

    def walk(obj, path: str, base: str):
        hints = typing.get_type_hints(type(obj))
        docs = _field_docs(type(obj))
        for f in dataclasses.fields(obj):
            sub = f"{path}{f.name}"
            if any(sub == s or sub.startswith(s + ".") for s in skip):
                continue
            value = getattr(obj, f.name)
            if _is_section(value):
                walked.add(sub)
                walk(value, sub + ".", sections.get(sub, f"{base}{f.name}."))
                continue
            name = names.get(sub, prefix + base + f.name)
            text = helps.get(sub) or f.metadata.get("help") or docs.get(f.name) or sub
            hint = hints[f.name]
            values = choices.get(sub) or f.metadata.get("choices")
            if values is None and typing.get_origin(hint) is typing.Literal:
                values = typing.get_args(hint)
            if values is not None:
                flags.DEFINE_enum(name, value, list(values), text, flag_values=flag_values)
            elif hint is bool:
                flags.DEFINE_boolean(name, value, text, flag_values=flag_values)
            else:
                convert, type_name = _converter(hint)
                flags.DEFINE(_Parser(convert, type_name), name, value, text,
                             serializer=_Serializer(), flag_values=flag_values)
            made.append(_Flag(sub, name))

    walk(default, "", "")
    unknown = sorted((set(names) | set(helps) | set(choices)) - {f.path for f in made})
    unknown += sorted(set(sections) - walked)
    if unknown:
        raise ValueError(f"names/helps/choices/sections for fields without a flag: {unknown}")
    return ConfigFlags(default, made, flag_values)
