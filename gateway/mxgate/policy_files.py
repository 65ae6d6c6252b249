"""Reading ProviderPolicy files: plain YAML data only; every refusal names the file (and the line).

``load_policy_dir`` reads every ``*.yaml``/``*.yml`` file of a directory (``mxgate controller``,
``mxgate dev``), ``load_policy_file`` one file (``mxgate policy validate``). A policy file is what
``kubectl apply -f`` takes: UTF-8 text, one or more YAML documents, each a ProviderPolicy mapping (a
file with none is an error). PyYAML's ``SafeLoader`` reads more than that, and some of it does harm
here, so ``PolicyLoader`` refuses it:

- **duplicate keys**: PyYAML keeps the last one silently (``maxConnections`` twice: which one is in
  force?); kubectl refuses them too.
- **anchors and aliases** (``&a`` / ``*a``): a few lines of nested aliases expand to gigabytes
  ("billion laughs"); policies have no use for them.
- **explicit tags** (``!!binary``, ``!!timestamp``, ``!!set``): values kubectl's YAML reader reads
  differently, and constructors that fail with Python errors instead of YAML ones.
- **nesting deeper than** ``MAX_DEPTH``: PyYAML composes recursively; a deep ``[[[[...]]]]`` would be a
  RecursionError. A policy is six levels deep.
- **unquoted timestamps** stay strings (the model checks ``startDate``); PyYAML would turn
  ``2026-11-31`` into a ValueError.
- files over ``MAX_FILE_BYTES`` (a policy is a few KB; Kubernetes objects stop at 1.5 MB) and bytes
  that are not UTF-8.

Integers longer than Python converts (4300 digits) are refused with their line, like any value a
constructor cannot build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node

from mxgate.errors import PolicyError
from mxgate.policy import ProviderPolicy, parse_policy

__all__ = ["MAX_DEPTH", "MAX_FILE_BYTES", "PolicyLoader", "load_policy_dir", "load_policy_file",
           "read_policy_documents"]

MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 32
_MERGE = "tag:yaml.org,2002:merge"


class PolicyLoader(yaml.SafeLoader):
    """SafeLoader for plain data: no duplicate keys, anchors, aliases, tags, timestamps or deep nesting."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]  # PyYAML's stubs leave it untyped
        mark = event.start_mark
        if isinstance(event, yaml.AliasEvent):
            raise ComposerError(None, None, f"found an alias (*{event.anchor}): anchors and aliases are not "
                                "allowed in a policy file", mark)
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise ComposerError(None, None, f"found an anchor (&{anchor}): anchors and aliases are not "
                                "allowed in a policy file", mark)
        tag = getattr(event, "tag", None)
        if tag is not None:
            shown = tag.replace("tag:yaml.org,2002:", "!!")
            raise ComposerError(None, None, f"found the tag {shown}: tags are not allowed in a policy file", mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:
            # e.g. an integer of 5000 digits (Python's int() refuses over 4300): a YAML error with its line.
            reason = str(exc).split(";")[0]   # not Python's advice on sys.set_int_max_str_digits()
            raise ConstructorError(None, None, f"cannot read this value: {reason}", node.start_mark) from exc

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                before = first.setdefault(key, key_node)
            except TypeError:
                continue  # an unhashable key: SafeLoader's own construct_mapping reports it
            if before is not key_node:
                raise ConstructorError(None, None, f"found the key {key!r} twice in one mapping (first on line "
                                       f"{before.start_mark.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep)


# kubectl reads an unquoted date as a string; so does a policy file (the model checks it is a real date).
PolicyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def _where(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """One line: where, and what (PyYAML's own str() spans several lines and quotes the source)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        what = "; ".join(p for p in (exc.context, exc.problem) if p) or "not valid YAML"
        mark = exc.problem_mark or exc.context_mark
        return f"{_where(mark)}: {what}" if mark is not None else what
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return f"line {line}: character #x{code:04x} is not allowed in YAML ({exc.reason})"
    return str(exc).replace("\n", " ")


def read_policy_documents(path: Path) -> list[Any]:
    """The documents of one policy file (``None`` for an empty one), or a PolicyError naming the file."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise PolicyError(f"{path}: larger than {MAX_FILE_BYTES // 1024} KiB: not a policy file")
        data = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read: {exc.strerror}") from exc
    if len(data) > MAX_FILE_BYTES:   # it grew between stat() and read
        raise PolicyError(f"{path}: larger than {MAX_FILE_BYTES // 1024} KiB: not a policy file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PolicyError(f"{path}: line {line}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
                          "policy files are UTF-8 text") from exc
    try:
        return list(yaml.load_all(text, Loader=PolicyLoader))
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {_yaml_problem(exc, text)}") from exc
    except RecursionError as exc:   # MAX_DEPTH keeps the composer away from it; this is the backstop
        raise PolicyError(f"{path}: not valid YAML: nested too deeply") from exc


def load_policy_file(path: Path) -> list[ProviderPolicy]:
    """The policies of one file; errors name the file.

    A file of several documents names the document at fault as ``path[i]`` (``i`` counts every
    document, empty ones too). A file with no policy at all is an error: it is not what its name says.
    """
    documents = read_policy_documents(path)
    found = [(index, document) for index, document in enumerate(documents) if document is not None]
    if not found:
        raise PolicyError(f"{path}: no ProviderPolicy in the file (it is empty or holds only comments)")
    policies: list[ProviderPolicy] = []
    for index, document in found:
        source = f"{path}" if len(found) == 1 else f"{path}[{index}]"
        if not isinstance(document, dict):
            raise PolicyError(f"{source}: expected a ProviderPolicy mapping, got {type(document).__name__}")
        policy = parse_policy(document, source=source)
        if any(p.name == policy.name for p in policies):   # as load_policy_dir refuses it across files
            raise PolicyError(f"{source}: policy {policy.name!r} is defined twice in the file")
        policies.append(policy)
    return policies


def load_policy_dir(directory: Path) -> list[ProviderPolicy]:
    """Every policy in ``directory``; errors name the file. Duplicate names are an error."""
    if not directory.is_dir():
        raise PolicyError(f"{directory}: not a directory")
    policies: list[ProviderPolicy] = []
    seen: dict[str, Path] = {}
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        for policy in load_policy_file(path):
            if policy.name in seen:
                raise PolicyError(f"{path}: policy {policy.name!r} is also defined in {seen[policy.name]}")
            seen[policy.name] = path
            policies.append(policy)
    return policies
