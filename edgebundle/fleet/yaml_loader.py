"""Position-keeping YAML: a document as plain Python values plus where each key path is.

Owns reading YAML with PyYAML's composer (not its constructor), so every value keeps
its line and column and a schema error can point at ``file:line:column``. Knows
nothing about manifests: :mod:`edgebundle.fleet.manifest_file` turns what it returns into
:class:`~edgebundle.fleet.manifest_file.Problem` s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

KeyPath = tuple[str | int, ...]
Where = tuple[int, int]  # 1-based line, column


@dataclass(frozen=True)
class Position:
    value: Where  # where the node starts
    key: Where | None  # where its key starts (mapping values only)
    text: str | None = None  # an unquoted scalar as written (0123 is 83 to YAML 1.1)

    @property
    def anchor(self) -> Where:
        return self.key or self.value


@dataclass
class Loaded:
    """What :func:`read_yaml` found. ``unreadable`` is set (and ``data`` None) when the
    text is not one YAML document; ``problems`` are values that could not be read."""

    data: Any = None
    positions: dict[KeyPath, Position] = field(default_factory=dict)
    problems: list[tuple[KeyPath, Where, str]] = field(default_factory=list)
    unreadable: tuple[Where, str] | None = None
    empty: bool = False


def mark(position: yaml.Mark) -> Where:
    return position.line + 1, position.column + 1


class _Reader:
    """YAML node tree -> Python values, remembering each key path's position."""

    def __init__(self, loader: yaml.SafeLoader) -> None:
        self.loader = loader
        self.positions: dict[KeyPath, Position] = {}
        self.problems: list[tuple[KeyPath, Where, str]] = []
        self._open: set[int] = set()

    def read(self, node: yaml.Node, path: KeyPath, key: yaml.Node | None) -> Any:
        plain = isinstance(node, yaml.ScalarNode) and node.style is None
        self.positions[path] = Position(mark(node.start_mark),
                                        mark(key.start_mark) if key is not None else None,
                                        str(node.value) if plain else None)
        if id(node) in self._open:
            self.problems.append((path, mark(node.start_mark), "an alias refers to itself"))
            return None
        if isinstance(node, yaml.ScalarNode):
            try:
                return self.loader.construct_object(node)
            except (ValueError, TypeError, yaml.YAMLError) as exc:  # e.g. !!int x
                why = exc.problem if isinstance(exc, yaml.MarkedYAMLError) else str(exc)
                self.problems.append((path, mark(node.start_mark),
                                      f"{node.tag} cannot read {node.value!r}: {why}"))
                return None
        self._open.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.read(item, (*path, i), None) for i, item in enumerate(node.value)]
            assert isinstance(node, yaml.MappingNode)
            result: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    self.problems.append((path, mark(key_node.start_mark),
                                          "a key must be a plain word, not a list or mapping"))
                    continue
                name = str(key_node.value)  # as written: device ids like 1234 stay text
                if name in result:
                    self.problems.append(((*path, name), mark(key_node.start_mark),
                                          "duplicate key: it was already set above"))
                result[name] = self.read(value_node, (*path, name), key_node)
            return result
        finally:
            self._open.discard(id(node))


def read_yaml(text: str) -> Loaded:
    """One YAML document with the position of every key path (see :class:`Loaded`)."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            problem_mark = exc.problem_mark or exc.context_mark
            where = mark(problem_mark) if problem_mark is not None else (1, 1)
            what = exc.problem or exc.context or "unreadable"
            if exc.problem and exc.context:
                opened = exc.context_mark
                at = f" at {opened.line + 1}:{opened.column + 1}" if opened else ""
                what += f" ({exc.context}{at})"
            return Loaded(unreadable=(where, what))
        except yaml.YAMLError as exc:
            return Loaded(unreadable=((1, 1), str(exc)))
        if node is None:
            return Loaded(empty=True)
        reader = _Reader(loader)
        data = reader.read(node, (), None)
        return Loaded(data=data, positions=reader.positions, problems=reader.problems)
    finally:
        loader.dispose()


def dotted(path: Sequence[str | int]) -> str:
    """A key path as people write it: ``spec.rollout.phases[1].percent``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text
