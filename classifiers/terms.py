"""Parameters named in classifiers' messages, said in the caller's own terms.

An API message marks each parameter it names with param(): str(exc) says the Python name
(`out /x: a file, not a folder`, `pass split=FILE`), the CLI the flag the user typed
(`--out /x: ...`, `pass --split FILE`), a job spec its config field. The marks, not word
matching, tell a parameter from the same ordinary word ("out", "split", "head") anywhere in
the message.
"""
from __future__ import annotations

import re
from typing import Callable

_OPEN, _CLOSE = "\x02", "\x03"  # control characters: never in a path or a message's own text
_MARK = re.compile("\x02(\\w+)(?:=([^\x02\x03]*))?\x03")

# term(name, value) -> the words for parameter `name` (given `value`, or None for the name alone)
Term = Callable[[str, "str | None"], str]


def param(name: str, value: object = None) -> str:
    """Parameter `name` (with `value`: a setting to pass, e.g. param("split", "FILE")) as a mark in a message."""
    return f"{_OPEN}{name}{'' if value is None else '=' + str(value)}{_CLOSE}"


def python_term(name: str, value: str | None) -> str:
    """name, or name=VALUE for a placeholder number or constant (split=FILE, cv=2, overwrite=True), name='text' for a word (head='logreg')."""
    if value is None:
        return name
    bare = re.fullmatch(r"[A-Z][A-Z_]*|[-+\d.e]+|True|False|None", value) is not None
    return f"{name}={value if bare else repr(value)}"


def render(message: str, term: Term = python_term) -> str:
    return _MARK.sub(lambda m: term(m.group(1), m.group(2)), message)


def mentioned(message: str) -> list[str]:
    """The parameters a message marks, in order, each once."""
    return list(dict.fromkeys(m.group(1) for m in _MARK.finditer(message)))


class Worded:
    """Mixin for classifiers' exceptions: built from a message with param() marks, str() says the
    Python names; .worded(term) says them as a caller does (the CLI: flags; a job spec: fields).
    .params lists the parameters the message names."""

    def __init__(self, message: object = "", *args):
        self.template = str(message)
        super().__init__(render(self.template), *args)

    @property
    def params(self) -> list[str]:
        return mentioned(self.template)

    def worded(self, term: Term) -> str:
        return render(self.template, term)


def spec_term(name: str, value: str | None) -> str:
    """A job spec's words: config.out, config.split: FILE."""
    return f"config.{name}" if value is None else f"config.{name}: {value}"
