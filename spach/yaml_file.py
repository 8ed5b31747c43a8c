"""YAML for people: PyYAML's safe loader that refuses a key written twice in one mapping, naming both lines.

PyYAML (like the YAML 1.1 spec's loaders in general) keeps the last of two equal keys, so a second
``recipe:`` block silently replaces the first and ``epochs: 1 ... epochs: 5`` trains five epochs.
:func:`load` raises :class:`DuplicateKeyError` instead::

    from spach.yaml_file import load
    raw = load(path.read_text())   # DuplicateKeyError: duplicate key 'epochs' (lines 3 and 9)

Merge keys (``<<: *defaults``) keep their meaning: keys merged in may be overridden by the mapping's own.
"""
from __future__ import annotations

from typing import Any

import yaml

MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(yaml.YAMLError):
    """A key written twice in one mapping; the message names the key and both lines (1-based)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose mappings refuse a repeated key while they are constructed."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = first_line.get(key)
            except TypeError:  # an unhashable key: the base loader says so
                continue
            line = key_node.start_mark.line + 1
            if earlier is not None:
                raise DuplicateKeyError(f"duplicate key {key!r} (lines {earlier} and {line}): YAML would keep "
                                        "the second silently; write each key once")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def load(text: str) -> Any:
    """Parse one YAML document with the safe loader, refusing duplicate keys (:class:`DuplicateKeyError`)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 — a SafeLoader subclass
