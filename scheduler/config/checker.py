"""The checker that collects located problems while jobs.yaml's sections are read."""

from __future__ import annotations

from typing import Any

from scheduler.config.scalars import Convert, Invalid, T
from scheduler.config.wording import Key, describe, is_secret, path_text, unknown_key
from scheduler.config.yamlsource import MAX_PROBLEMS, Doc, Where
from scheduler.errors import ConfigProblem


class Checker:
    """Collects located problems while sections are read from the document's values."""

    def __init__(self, file: str, doc: Doc) -> None:
        self.file, self.doc = file, doc
        self.problems = [
            ConfigProblem(file, line, col, path_text(path), message)
            for (line, col), path, message in doc.problems
        ]
        if doc.empty and not doc.fatal:
            self.problems.append(
                ConfigProblem(file, 1, 1, "", "the file is empty; it needs at least a jobs: list")
            )
        self.count = len(self.problems) + doc.hidden  # every problem, shown or not

    def report(self) -> list[ConfigProblem]:
        """The problems in file order, the last one saying how many more were left out."""
        shown = sorted(self.problems, key=lambda p: (p.line, p.col))
        if self.count > len(shown):
            last = shown[-1]
            shown.append(
                ConfigProblem(
                    self.file,
                    last.line,
                    last.col,
                    "",
                    f"and {self.count - len(shown)} more problems not shown",
                )
            )
        return shown

    def where(self, path: Key, *, key: bool = False) -> Where:
        """Where the value (or with ``key``, the key) at ``path`` starts."""
        if key and path in self.doc.keys:
            return self.doc.keys[path]
        while path and path not in self.doc.values:
            path = path[:-1]  # a missing key is reported where its mapping starts
        return self.doc.values.get(path, (1, 1))

    def error(self, path: Key, message: str, *, key: bool = False) -> None:
        """Report ``message`` about the value (or key) at ``path``."""
        if path in self.doc.unreadable:
            return  # its value could not be read, which is reported already
        self.count += 1
        if len(self.problems) < MAX_PROBLEMS:
            line, col = self.where(path, key=key)
            self.problems.append(ConfigProblem(self.file, line, col, path_text(path), message))

    def mapping(self, path: Key, value: Any, allowed: tuple[str, ...]) -> dict[str, Any] | None:
        """``value`` if it is a mapping (its unknown keys reported), else None (reported)."""
        if not isinstance(value, dict):
            got = "text" if isinstance(value, str) and is_secret(path) else describe(value)
            self.error(path, f"must be a mapping with keys {', '.join(allowed)}, got {got}")
            return None
        for key in value:
            if key not in allowed:
                self.error((*path, key), unknown_key(key, allowed), key=True)
        return value

    def section(self, data: dict[str, Any], key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        """A top-level section: a mapping of ``allowed`` keys; null or a wrong value is {}."""
        value = data.get(key)
        return {} if value is None else self.mapping((key,), value, allowed) or {}

    def convert(self, path: Key, value: Any, convert: Convert[T], default: T) -> T:
        """``convert(value)``, or ``default`` with the problem reported at ``path``."""
        try:
            return convert(value)
        except Invalid as exc:
            message = str(exc)
            if not is_secret(path) and not exc.quoted:
                message += f", got {describe(value)}"
            self.error(path, message)
            return default

    def get(self, path: Key, data: dict[str, Any], key: str, convert: Convert[T], default: T) -> T:
        """``data[key]`` converted, or ``default`` when the key is absent or invalid."""
        if key not in data:
            return default
        return self.convert((*path, key), data[key], convert, default)
