"""The invalid table, in Python: api.parse refuses each case and names the field.

tests/cluster/test_crd.py runs the same table against the API server, so the two
layers are held to the same rules and the same field paths.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from imagegen_operator import api
from imagegen_operator.schema import KubeModel

CASES_FILE = Path(__file__).resolve().parents[1] / "data" / "invalid" / "cases.yaml"
FIELD = "test.imagegen.dev/expect-field"
TEXT = "test.imagegen.dev/expect-text"


def load_cases() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(CASES_FILE.read_text()) if doc]


def names_field(message: str, field: str) -> bool:
    """The field path appears as a whole path, followed by ':' (or '"' in kubectl's form)."""
    return re.search(r"(?<![\w.])" + re.escape(field) + r"(?=[:\"])", message) is not None


CASES = load_cases()


def test_table_is_big_and_well_formed():
    assert len(CASES) >= 20
    names = [c["metadata"]["name"] for c in CASES]
    assert len(names) == len(set(names))
    assert all(c["metadata"]["annotations"][FIELD].startswith("spec") for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c["metadata"]["name"] for c in CASES])
def test_parse_rejects_and_names_the_field(case):
    annotations = case["metadata"]["annotations"]
    with pytest.raises(api.InvalidSpec) as err:
        api.parse(case)
    message = str(err.value)
    assert names_field(message, annotations[FIELD]), message
    if TEXT in annotations:
        assert annotations[TEXT] in message
    # Named once: not as a path and again as the rule's own words.
    field = annotations[FIELD]
    assert f"{field}: {field.removeprefix('spec.')}: " not in message, message


def test_every_cross_field_rule_has_a_case():
    models = [m for m in vars(api).values() if isinstance(m, type) and issubclass(m, KubeModel)]
    # As an error gives them: past the field the path names already.
    messages = {r.message.removeprefix(f"{r.field.removeprefix('.')}: ")
                for m in models for r in m.rules}
    hit = set()
    for case in CASES:
        try:
            api.parse(case)
        except api.InvalidSpec as err:
            hit |= {m for m in messages if m in str(err)}
    # The per-type MIG rules share a shape; the table covers each GPU type's one.
    assert messages - hit == set()


def test_names_field_is_exact():
    assert names_field("spec.nodePool.cluster: Required value", "spec.nodePool.cluster")
    assert not names_field("spec.nodePool.cluster: Required value", "spec.nodePool")
    assert names_field('strict decoding error: unknown field "spec.gpu.x"', "spec.gpu.x")
