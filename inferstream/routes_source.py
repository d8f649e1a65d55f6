"""A routes file read into plain values with the line of every field: YAML from PyYAML's node tree, TOML by scanning its text.

Also the ``${NAME}`` / ``${NAME:-default}`` expansion of string values, which
happens after parsing so that every line number still points into the file.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]


class SourceError(Exception):
    """The file is not valid YAML or TOML; ``line`` is where the parser stopped (None if unknown)."""

    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


@dataclass
class Document:
    """Parsed values, the line of each path in them, and what the reader already found wrong."""

    data: Any
    lines: dict[Path, int] = field(default_factory=dict)
    problems: list[tuple[Path, str]] = field(default_factory=list)

    def line(self, path: Path) -> int | None:
        """The line of ``path``, else of its nearest enclosing field (a missing field: the mapping lacking it)."""
        for end in range(len(path), -1, -1):
            found = self.lines.get(path[:end])
            if found is not None:
                return found
        return None


def dotted(path: Path) -> str:
    """``("routes", 1, "backends", 0, "weight")`` -> ``routes[1].backends[0].weight``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


# ---- YAML --------------------------------------------------------------------


def read_yaml(text: str) -> Document:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        reason = exc.problem or exc.context or "invalid YAML"
        raise SourceError(f"YAML syntax error: {reason}", mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise SourceError(f"YAML syntax error: {exc}", None) from None
    doc = Document(None, {(): root.start_mark.line + 1 if root is not None else 1})
    if root is not None:
        doc.data = _yaml_value(root, (), doc, yaml.SafeLoader(""), set())
    return doc


def _yaml_value(node: yaml.Node, path: Path, doc: Document, loader: yaml.SafeLoader, active: set[int]) -> Any:
    if id(node) in active:  # an alias of its own ancestor: a recursive structure no route can be
        doc.problems.append((path, "refers to itself (recursive YAML alias)"))
        return None
    try:
        if isinstance(node, yaml.MappingNode):
            active.add(id(node))
            out: dict[str, Any] = {}
            own, merged = _yaml_pairs(node, path, doc, active)
            for key_node, value_node, inherited in own + merged:
                key = loader.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else None
                if not isinstance(key, str):
                    doc.lines[path + (str(key),)] = key_node.start_mark.line + 1
                    doc.problems.append((path + (str(key),), "field names must be strings"))
                    continue
                sub = path + (key,)
                if key in out:
                    if not inherited:
                        doc.lines[sub] = key_node.start_mark.line + 1
                        doc.problems.append((sub, "appears twice in the same mapping"))
                    continue  # a merged (`<<`) field yields to the mapping's own and to earlier merges
                doc.lines[sub] = key_node.start_mark.line + 1
                out[key] = _yaml_value(value_node, sub, doc, loader, active)
            active.discard(id(node))
            return out
        if isinstance(node, yaml.SequenceNode):
            active.add(id(node))
            items = []
            for index, item in enumerate(node.value):
                doc.lines[path + (index,)] = item.start_mark.line + 1
                items.append(_yaml_value(item, path + (index,), doc, loader, active))
            active.discard(id(node))
            return items
        return loader.construct_object(node, deep=True)
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark or node.start_mark
        raise SourceError(f"YAML: {exc.problem or exc}", mark.line + 1) from None


_MERGE_TAG = "tag:yaml.org,2002:merge"
_Pair = tuple[yaml.Node, yaml.Node, bool]


def _yaml_pairs(node: yaml.MappingNode, path: Path, doc: Document, active: set[int]) -> tuple[list[_Pair], list[_Pair]]:
    """A mapping's own (key, value) nodes and those merged in by ``<<`` keys, without changing the nodes (aliases share them)."""
    own: list[_Pair] = []
    merged: list[_Pair] = []
    for key_node, value_node in node.value:
        if key_node.tag != _MERGE_TAG:
            own.append((key_node, value_node, False))
            continue
        sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
        for source in sources:
            if not isinstance(source, yaml.MappingNode) or id(source) in active:
                doc.lines.setdefault(path + ("<<",), key_node.start_mark.line + 1)
                doc.problems.append((path + ("<<",), "a merge key (<<) takes a mapping or a list of mappings"))
                continue
            active.add(id(source))
            inner_own, inner_merged = _yaml_pairs(source, path, doc, active)
            active.discard(id(source))
            merged.extend((k, v, True) for k, v, _ in inner_own + inner_merged)
    return own, merged


# ---- TOML --------------------------------------------------------------------

_TOML_AT = re.compile(r"\s*\(at line (\d+), column \d+\)")
_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\[\]]+?)\s*(\]\]?)\s*$")
_BARE_OR_QUOTED = r"(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')"
_KEY = re.compile(rf"\s*({_BARE_OR_QUOTED}(?:\s*\.\s*{_BARE_OR_QUOTED})*)\s*=")
_MASKED = set("[]{}#=,.")  # inside strings these must not count as structure


def read_toml(text: str) -> Document:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        found = _TOML_AT.search(message)
        line = int(found.group(1)) if found else None
        raise SourceError(f"TOML syntax error: {_TOML_AT.sub('', message)}", line) from None
    return Document(data, toml_lines(text))


@dataclass
class _Frame:
    kind: str  # "[" an array, "{" an inline table
    path: Path
    count: int = 0  # arrays: the next element's index
    key: Path | None = None  # inline tables: the path of the key whose value is being read


def toml_lines(text: str) -> dict[Path, int]:
    """The line of each table header and ``key =`` of a TOML text, by concrete path (array tables indexed)."""
    lines: dict[Path, int] = {(): 1}
    table: Path = ()
    counters: dict[Path, int] = {}  # array of tables -> index of its latest element
    stack: list[_Frame] = []  # values (arrays, inline tables) still open from earlier lines
    state: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        code, state = _sanitize(raw, state)
        if stack:
            _scan_value(code, 0, None, stack, lines, number)
            continue
        header = _HEADER.match(code)
        if header and len(header.group(1)) == len(header.group(3)):
            table = _header_path(_key_parts(header.group(2)), header.group(1) == "[[", counters)
            for end in range(1, len(table) + 1):
                lines.setdefault(table[:end], number)
            lines[table] = number
            continue
        key = _KEY.match(code)
        if key:
            path = table + _key_parts(key.group(1))
            for end in range(len(table) + 1, len(path)):
                lines.setdefault(path[:end], number)
            lines.setdefault(path, number)
            _scan_value(code, key.end(), path, stack, lines, number)
    return lines


def _header_path(parts: tuple[str, ...], is_array: bool, counters: dict[Path, int]) -> Path:
    concrete: list[str | int] = []
    for index, part in enumerate(parts):
        concrete.append(part)
        here = tuple(concrete)
        if is_array and index == len(parts) - 1:
            counters[here] = counters.get(here, -1) + 1
            concrete.append(counters[here])
        elif here in counters:
            concrete.append(counters[here])
    return tuple(concrete)


def _scan_value(code: str, pos: int, path: Path | None, stack: list[_Frame], lines: dict[Path, int], number: int) -> None:
    """Follow the brackets of a value so that elements of arrays and keys of inline tables get their lines."""
    while pos < len(code):
        char = code[pos]
        if char in "[{":
            if stack and stack[-1].kind == "[":
                opened: Path | None = stack[-1].path + (stack[-1].count,)
                stack[-1].count += 1
            elif stack:
                opened = stack[-1].key or stack[-1].path
            else:
                opened = path
            if opened is None:  # a stray bracket outside any value: nothing to locate
                pos += 1
                continue
            lines.setdefault(opened, number)
            stack.append(_Frame(char, opened))
        elif char in "]}" and stack:
            stack.pop()
        if char in "{," and stack and stack[-1].kind == "{":
            key = _KEY.match(code, pos + 1)
            if key:
                stack[-1].key = stack[-1].path + _key_parts(key.group(1))
                lines.setdefault(stack[-1].key, number)
                pos = key.end()
                continue
        pos += 1


def _key_parts(key: str) -> tuple[str, ...]:
    return tuple(part.strip().strip("\"'") for part in key.split("."))


def _sanitize(line: str, state: str | None) -> tuple[str, str | None]:
    """The line without its comment and with structure characters inside strings masked; ``state``: an open multi-line string."""
    out: list[str] = []
    pos = 0
    while pos < len(line):
        if state is not None:
            if line.startswith(state, pos):
                out.append(state)
                pos += 3
                state = None
            elif state == '"""' and line[pos] == "\\":
                out.append("__")
                pos += 2
            else:
                out.append("_" if line[pos] in _MASKED else line[pos])
                pos += 1
            continue
        char = line[pos]
        if char == "#":
            break
        if line.startswith('"""', pos) or line.startswith("'''", pos):
            state = line[pos : pos + 3]
            out.append(state)
            pos += 3
            continue
        if char in "\"'":
            end = pos + 1
            out.append(char)
            while end < len(line) and line[end] != char:
                if char == '"' and line[end] == "\\":
                    out.append("__")
                    end += 2
                    continue
                out.append("_" if line[end] in _MASKED else line[end])
                end += 1
            out.append(char)
            pos = end + 1
            continue
        out.append(char)
        pos += 1
    return "".join(out), state


# ---- ${NAME} expansion -------------------------------------------------------

_VARIABLE = re.compile(r"\$\$|\$\{([^}]*)\}|\$\{")
_NAME_DEFAULT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)(.*))?$", re.DOTALL)


def expand(value: Any, path: Path, environ: Mapping[str, str], expanded: set[Path], problems: list[tuple[Path, str]]) -> Any:
    """Every string value with ``${NAME}``, ``${NAME:-default}`` (unset or empty) and ``${NAME-default}`` (unset) replaced; ``$$`` is ``$``."""
    if isinstance(value, dict):
        return {key: expand(item, path + (key,), environ, expanded, problems) for key, item in value.items()}
    if isinstance(value, list):
        return [expand(item, path + (index,), environ, expanded, problems) for index, item in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        inner = match.group(1)
        parsed = _NAME_DEFAULT.match(inner) if inner is not None else None
        if parsed is None:
            problems.append((path, f"malformed variable {match.group(0)!r}: use ${{NAME}} or ${{NAME:-default}}"))
            return match.group(0)
        name, operator, default = parsed.groups()
        current = environ.get(name)
        if operator == ":-" and not current:
            return str(default)
        if operator == "-" and current is None:
            return str(default)
        if current is None:
            problems.append((path, f"environment variable {name} is not set (write ${{{name}:-default}} for a default)"))
            return ""
        return current

    expanded.add(path)
    return _VARIABLE.sub(replace, value)
