"""values.yaml documents every key, the schema knows every key, the README lists every key.

The README's values table is generated from values.yaml's comments; after changing
values.yaml, rewrite it with

    python tests/unit/test_chart_values.py readme
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "imagegen-operator"
VALUES = CHART / "values.yaml"
README = CHART / "README.md"
SCHEMA = CHART / "values.schema.json"
BEGIN, END = "<!-- values:begin -->", "<!-- values:end -->"

KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z][A-Za-z0-9_]*):(?P<rest>.*)$")


@dataclass
class Key:
    path: str  # dotted: metrics.serviceMonitor.enabled
    comment: str
    value: Any


def lookup(values: dict[str, Any], path: str) -> Any:
    node: Any = values
    for part in path.split("."):
        node = node[part]
    return node


def documented_keys(text: str | None = None) -> list[Key]:
    """Every key of values.yaml, in file order, with the comment lines right above it."""
    text = VALUES.read_text() if text is None else text
    values = yaml.safe_load(text)
    keys: list[Key] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing maps
    comment: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("#").strip())
            continue
        if not stripped:
            comment = []  # a blank line ends a comment block: file headers belong to no key
            continue
        match = KEY.match(line)
        if not match:
            comment = []  # a list item or a continuation line
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [match["key"]])
        keys.append(Key(path, " ".join(comment), lookup(values, path)))
        stack.append((indent, match["key"]))
        comment = []
    return keys


def is_leaf(key: Key) -> bool:
    return not (isinstance(key.value, dict) and key.value)


def readme_table() -> str:
    """The values table for README.md: key, default, description."""
    rows = ["| key | default | description |", "| --- | --- | --- |"]
    for key in documented_keys():
        if is_leaf(key):
            default = json.dumps(key.value, sort_keys=True)
            rows.append(f"| `{key.path}` | `{default}` | {key.comment} |")
    return "\n".join(rows)


def schema_paths() -> set[str]:
    schema = json.loads(SCHEMA.read_text())
    paths = set()

    def walk(node: dict[str, Any], prefix: str) -> None:
        for name, child in node.get("properties", {}).items():
            path = f"{prefix}.{name}" if prefix else name
            paths.add(path)
            walk(child, path)
        if isinstance(node.get("additionalProperties"), dict):
            paths.add(f"{prefix}.*")  # a map: any key (resources.requests.cpu)

    walk(schema, "")
    return paths


# --- tests -------------------------------------------------------------------------------


def test_the_parser_finds_nested_keys_and_their_comments():
    keys = documented_keys("# header\n\n# The a.\na:\n  # The b.\n  b: 1\n  c:\n    - x\n")
    assert [(k.path, k.comment) for k in keys] == [("a", "The a."), ("a.b", "The b."), ("a.c", "")]
    assert [is_leaf(k) for k in keys] == [False, True, True]


def test_every_key_has_a_full_sentence():
    keys = documented_keys()
    assert len(keys) > 50
    # A capital letter first, a full stop last, and more than a couple of words between.
    bad = [k.path for k in keys
           if not re.fullmatch(r"[A-Z`(].*[^.][.]", k.comment) or len(k.comment.split()) < 4]
    assert bad == [], "each values.yaml key needs a comment sentence above it"


def test_every_key_is_in_the_schema_and_back():
    in_values = {k.path for k in documented_keys()}
    in_schema = schema_paths()
    refused = {p for p in in_values
               if p not in in_schema and f"{p.rsplit('.', 1)[0]}.*" not in in_schema}
    assert refused == set(), "keys the schema would refuse"
    # The schema may describe what a map holds (podSecurityContext.fsGroup), but not a
    # top-level key values.yaml does not document (except Helm's own `global`).
    top_values = {p for p in in_values if "." not in p}
    top_schema = {p for p in in_schema if "." not in p} - {"global"}
    assert top_schema == top_values


def test_readme_lists_every_key():
    readme = README.read_text()
    for key in documented_keys():
        if is_leaf(key):
            assert f"`{key.path}`" in readme, f"{key.path} is not in the README"


def test_readme_table_is_generated_from_values():
    readme = README.read_text()
    assert BEGIN in readme and END in readme
    table = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert table == readme_table(), "run `python tests/unit/test_chart_values.py readme`"


def write_readme() -> None:
    readme = README.read_text()
    head, rest = readme.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    README.write_text(f"{head}{BEGIN}\n{readme_table()}\n{END}{tail}")
    print(f"wrote {README}")


if __name__ == "__main__":
    if sys.argv[1:] != ["readme"]:
        sys.exit(__doc__)
    write_readme()
