"""Reading jobs.yaml: the size cap, UTF-8, and YAML events turned into values with positions.

The file is read with libyaml's safe parser event by event, and the events are turned into
Python values here (not by PyYAML's composer), so that depth, alias expansion and duplicate
keys are checked before they can cost memory, time or a silent overwrite, and every value
keeps the line and column it came from. ``read_document`` is the entry point.

Not ``yaml.compose()``: its node graph gives an alias the anchored node itself, so where an
alias is used (and so where a value came from) is lost; it refuses a redefined anchor and
stops at an undefined alias; and composing plus the least walk over the nodes is slower than
this whole reader (``python -m bench.config_load``: 0.45 s against 0.34 s for 10,000 jobs).
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from scheduler.config.wording import Key, describe, is_secret, short
from scheduler.errors import ConfigError, ConfigProblem

MAX_BYTES = 8 * 1024 * 1024  # the file size cap of SPEC section 3
# Values after alias expansion. 100,000 one-test jobs are 1 M values (and fill the 8 MiB
# cap); a document at this cap loads in a few seconds, like the biggest real file, and a
# billion-laughs one is refused as soon as the count passes it, before anything expands.
MAX_NODES = 2_000_000
MAX_DEPTH = 20  # nesting levels; jobs.yaml needs 4, and every value keeps its path
MAX_PROBLEMS = 100  # reported in full; beyond that only counted, like a compiler's error limit
MAX_READ_PROBLEMS = 1_000  # reading stops here: each costs an exception, and no one reads them

Where = tuple[int, int]
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 15x faster, same rules
_INT_TAG = "tag:yaml.org,2002:int"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_STR_TAG = "tag:yaml.org,2002:str"
_SCALAR_TAGS = {
    f"tag:yaml.org,2002:{name}"
    for name in ("null", "bool", "int", "float", "str", "timestamp", "binary")
}
_PLAIN_TAGS = (None, "!", "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")
_CANONICAL_INT = re.compile(r"[-+]?(0|[1-9][0-9]*)")
_PLAIN_FLOAT = re.compile(r"[-+]?[0-9]+\.[0-9]+")  # a subset of YAML 1.1 floats, same value
_NO_KEY, _BAD_KEY, _MERGE, _UNREADABLE = object(), object(), object(), object()


class _Stop(Exception):
    """A problem after which the rest of the document cannot be read."""

    def __init__(self, where: Where, message: str) -> None:
        super().__init__(message)
        self.where, self.message = where, message


@dataclass(slots=True)  # one per mapping or list: slots make them cheaper to build
class _Frame:
    """A mapping or sequence being filled."""

    value: dict[str, Any] | list[Any]
    path: Key
    where: Where
    anchor: str | None
    start_nodes: int
    key: Any = _NO_KEY  # a mapping's pending key
    unreadable: bool = False  # an unsupported tag, reported at the start
    merges: list[tuple[Any, Where]] | None = None  # ``<<`` values, applied at the end


@dataclass
class Doc:
    """The document's values, where each value and key starts, and the problems met on the way."""

    root: Any = None
    values: dict[Key, Where] = field(default_factory=dict)
    keys: dict[Key, Where] = field(default_factory=dict)
    problems: list[tuple[Where, Key, str]] = field(default_factory=list)
    hidden: int = 0  # problems past MAX_PROBLEMS
    unreadable: set[Key] = field(default_factory=set)  # reported already; the value is None
    fatal: bool = False
    empty: bool = True


def read_document(path: Path, file: str) -> Doc:
    """The document's values and positions; ConfigError when the file cannot be read at all."""
    return _parse(_read_text(path, file), file)


def _fatal(file: str, message: str, line: int = 1, col: int = 1) -> ConfigError:
    return ConfigError([ConfigProblem(file, line, col, "", message)])


def _read_text(path: Path, file: str) -> str:
    """The file as text, refusing anything over MAX_BYTES before reading it all."""
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise _fatal(file, f"file is {size} bytes; the limit is 8 MiB")
        with path.open("rb") as handle:
            data = handle.read(MAX_BYTES + 1)  # a pipe or a growing file has no honest size
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        hint = " (give another with -c PATH or TE_SCHEDULER_CONFIG)" if not path.exists() else ""
        raise _fatal(file, f"cannot read the config file: {reason}{hint}") from None
    if len(data) > MAX_BYTES:
        raise _fatal(file, f"file is more than {MAX_BYTES} bytes; the limit is 8 MiB")
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        col = len(data[line_start : exc.start].decode("utf-8", "replace")) + 1
        message = f"not UTF-8 text (byte 0x{data[exc.start]:02X}); save the file as UTF-8"
        raise _fatal(file, message, line, col) from None


def _where(mark: Any) -> Where:
    return (mark.line + 1, mark.column + 1)


def _parse(text: str, file: str) -> Doc:
    """Build the document's values from parser events; syntax errors end it as ``fatal``."""
    doc = Doc()
    bad = yaml.reader.Reader.NON_PRINTABLE.search(text)
    if bad is not None:
        line, col = _line_col(text, bad.start())
        raise _fatal(
            file,
            f"control character U+{ord(bad.group()):04X} is not allowed; is this a text file?",
            line,
            col,
        )
    loader = None
    try:
        loader = _Loader(text)
        builder = _Builder(loader, doc)
        get_event, handlers = loader.get_event, builder.handlers
        # This loop runs once per event (about 14 per job): no check_event(), no feed() call.
        while (event := get_event()) is not None:
            handler = handlers.get(event.__class__)
            if handler is not None:
                handler(event)
    except _Stop as stop:
        doc.problems.append((stop.where, (), stop.message))
        doc.fatal = True
    except yaml.MarkedYAMLError as exc:
        doc.problems.append((_where(exc.problem_mark), (), _syntax_message(exc, text)))
        doc.fatal = True
    except (yaml.YAMLError, ValueError) as exc:  # marks are missing only on reader trouble
        doc.problems.append(((1, 1), (), f"cannot parse the YAML: {describe(str(exc))}"))
        doc.fatal = True
    finally:
        if loader is not None:
            loader.dispose()
    return doc


def _syntax_message(exc: yaml.MarkedYAMLError, text: str) -> str:
    message = f"YAML syntax error: {exc.problem or 'cannot parse'}"
    if exc.context and exc.context_mark is not None:
        line, col = _where(exc.context_mark)
        message += f", {exc.context} that starts at line {line}, column {col}"
    index = getattr(exc.problem_mark, "index", -1)
    if 0 <= index < len(text) and text[index] == "\t":
        message += "; indent with spaces, YAML does not allow tabs"
    return message[:300]


def _show_tag(tag: str) -> str:
    return short(tag.replace("tag:yaml.org,2002:", "!!"))


def _line_col(text: str, index: int) -> Where:
    line_start = text.rfind("\n", 0, index) + 1
    return (text.count("\n", 0, index) + 1, index - line_start + 1)


class _Builder:
    """Turns parser events into dicts, lists and scalars, as PyYAML's composer would, but
    counting every value an alias stands for, capping depth, and reporting duplicate keys."""

    def __init__(self, loader: Any, doc: Doc) -> None:
        self.loader, self.doc = loader, doc
        self.stack: list[_Frame] = []
        self.anchors: dict[str, tuple[Any, int]] = {}
        self.plain: dict[str, Any] = {}
        self.nodes = 0
        self.documents = 0
        # One lookup per event instead of an isinstance() chain: this runs for every value.
        self.handlers: dict[type, Callable[[Any], None]] = {
            yaml.ScalarEvent: self._scalar,
            yaml.MappingStartEvent: self._open,
            yaml.SequenceStartEvent: self._open,
            yaml.MappingEndEvent: self._close,
            yaml.SequenceEndEvent: self._close,
            yaml.AliasEvent: self._alias,
            yaml.DocumentStartEvent: self._document,
        }

    def _document(self, event: yaml.DocumentStartEvent) -> None:
        self.documents += 1
        if self.documents > 1:
            raise _Stop(
                _where(event.start_mark),
                "only one YAML document is allowed; remove the second '---'",
            )

    def _count(self, nodes: int, where: Where) -> None:
        self.nodes += nodes
        if self.nodes > MAX_NODES:
            raise _Stop(
                where,
                f"the document expands to more than {MAX_NODES:,} values "
                "(through aliases?); that is far more than a config needs",
            )

    def _problem(self, where: Where, path: Key, message: str) -> None:
        if len(self.doc.problems) < MAX_PROBLEMS:
            self.doc.problems.append((where, path, message))
        else:
            self.doc.hidden += 1
            if self.doc.hidden + MAX_PROBLEMS >= MAX_READ_PROBLEMS:
                raise _Stop(
                    where,
                    f"stopped reading after {MAX_READ_PROBLEMS:,} problems; "
                    "fix the first ones and try again",
                )

    def _alias(self, event: yaml.AliasEvent) -> None:
        where, name = _where(event.start_mark), str(event.anchor)
        if name not in self.anchors:
            inside = any(frame.anchor == name for frame in self.stack)
            why = "refers to a collection that contains it" if inside else "is not defined above"
            self._problem(where, self._child_path(), f"alias *{name[:40]} {why}")
            self.doc.unreadable.add(self._child_path())
            self._add(_UNREADABLE, where)
            return
        value, size = self.anchors[name]
        self._count(size, where)  # what expansion would cost, without expanding anything
        self._add(value, where)

    def _scalar(self, event: Any) -> None:
        mark = event.start_mark
        where = (mark.line + 1, mark.column + 1)
        self.nodes += 1  # _count(1, where), inline: this runs for every key and value
        if self.nodes > MAX_NODES:
            self._count(0, where)
        tag = event.tag
        if tag is not None and tag != "!":
            value = self._construct(tag, event, where)
        elif not event.implicit[0]:  # quoted: always text
            value = event.value
        else:  # resolving is most of the cost, and configs repeat values: cache them
            value = self.plain.get(event.value, _UNREADABLE)
            if value is _UNREADABLE:
                value = self._plain(event, where)
                if value is _MERGE:
                    self.stack[-1].key = _MERGE
                    return
        if event.anchor:
            self.anchors[str(event.anchor)] = (value, 1)
        self._add(value, where)

    def _plain(self, event: Any, where: Where) -> Any:
        """An untagged, unquoted scalar's value, as PyYAML resolves it (``_MERGE`` for ``<<``
        as a key); cached by its text unless it cannot be read."""
        text = event.value
        value: Any
        if len(text) <= 18 and _CANONICAL_INT.fullmatch(text):
            value = self.plain[text] = int(text)  # as resolved and constructed, but faster
            return value
        if len(text) <= 32 and _PLAIN_FLOAT.fullmatch(text):
            value = self.plain[text] = float(text)  # likewise
            return value
        tag = self.loader.resolve(yaml.ScalarNode, text, event.implicit)
        if tag == _MERGE_TAG and self._at_key():
            return _MERGE
        if tag == _INT_TAG and not _CANONICAL_INT.fullmatch(text):
            tag = _STR_TAG  # YAML 1.1 reads 0105 as octal 69 and 1:30 as 90
        value = self._construct(tag, event, where)
        if value is not _UNREADABLE:
            self.plain[text] = value
        return value

    def _construct(self, tag: str, event: Any, where: Where) -> Any:
        if tag == _STR_TAG:
            return event.value
        path = self._child_path()
        constructor = self.loader.yaml_constructors.get(tag) if tag in _SCALAR_TAGS else None
        if constructor is None:
            self._problem(where, path, f"tag {_show_tag(tag)} is not supported here")
        else:
            node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark)
            try:
                return constructor(self.loader, node)
            except Exception:  # PyYAML's constructors fail with Index-, Key-, ValueError...
                shown = "this value" if is_secret(path) else short(event.value)
                self._problem(where, path, f"{shown} is not a valid {tag.rsplit(':', 1)[-1]}")
        self.doc.unreadable.add(path)
        return _UNREADABLE

    def _open(self, event: yaml.CollectionStartEvent) -> None:
        where = _where(event.start_mark)
        if len(self.stack) >= MAX_DEPTH:
            raise _Stop(where, f"nesting is deeper than {MAX_DEPTH} levels")
        path = self._child_path()
        value: dict[str, Any] | list[Any] = {} if isinstance(event, yaml.MappingStartEvent) else []
        anchor = str(event.anchor) if event.anchor else None
        self.stack.append(_Frame(value, path, where, anchor, self.nodes))
        self._count(1, where)
        if event.tag not in _PLAIN_TAGS:
            self._problem(where, path, f"tag {_show_tag(str(event.tag))} is not supported here")
            self.doc.unreadable.add(path)
            self.stack[-1].unreadable = True

    def _close(self, event: yaml.CollectionEndEvent) -> None:
        frame = self.stack.pop()
        if frame.merges:
            assert isinstance(frame.value, dict)
            self._merge(frame, frame.value)
        value = _UNREADABLE if frame.unreadable else frame.value
        if frame.anchor:
            self.anchors[frame.anchor] = (value, self.nodes - frame.start_nodes)
        self._add(value, frame.where)

    def _merge(self, frame: _Frame, into: dict[str, Any]) -> None:
        """Apply ``<<: *anchor`` merges: explicit keys win, then earlier merges."""
        for value, where in frame.merges or ():
            for source in value if isinstance(value, list) else [value]:
                if not isinstance(source, dict):
                    self._problem(
                        where, frame.path, "a merge (<<) takes a mapping or a list of mappings"
                    )
                    continue
                self._count(len(source), where)
                for key, item in source.items():
                    if key not in into:
                        into[key] = item
                        path = (*frame.path, key)
                        self.doc.values[path] = where
                        self.doc.keys[path] = where

    def _at_key(self) -> bool:
        return (
            bool(self.stack)
            and isinstance(self.stack[-1].value, dict)
            and (self.stack[-1].key is _NO_KEY)
        )

    def _child_path(self) -> Key:
        if not self.stack:
            return ()
        top = self.stack[-1]
        if isinstance(top.value, list):
            return (*top.path, len(top.value))
        if isinstance(top.key, str):
            return (*top.path, top.key)
        return (*top.path, "<<") if top.key is _MERGE else top.path

    def _add(self, value: Any, where: Where) -> None:
        """Put ``value`` into its parent, or make it a key of it."""
        if value is _UNREADABLE:  # reported already; a key is dropped, a value becomes null
            if self._at_key():
                self.stack[-1].key = _BAD_KEY
                return
            value = None
        if not self.stack:
            self.doc.root, self.doc.empty = value, False
            self.doc.values[()] = where
            return
        top = self.stack[-1]
        parent = top.value
        if parent.__class__ is list:
            path = (*top.path, len(parent))
            self.doc.values[path] = where
            parent.append(value)
        elif top.key is _NO_KEY:
            top.key = self._key(top, value, where)
        else:
            key, top.key = top.key, _NO_KEY
            if key is _MERGE:
                if top.merges is None:
                    top.merges = []
                top.merges.append((value, where))
            elif key is not _BAD_KEY:
                parent[key] = value
                path = (*top.path, key)
                self.doc.values[path] = where

    def _key(self, top: _Frame, key: Any, where: Where) -> Any:
        if not isinstance(key, str):
            self._problem(where, top.path, f"keys must be text, got {describe(key)}")
            return _BAD_KEY
        assert isinstance(top.value, dict)
        path = (*top.path, key)
        if key in top.value:
            first = self.doc.keys[path][0]
            self._problem(where, path, f"duplicate key (first at line {first})")
            return _BAD_KEY
        self.doc.keys[path] = where
        return key
