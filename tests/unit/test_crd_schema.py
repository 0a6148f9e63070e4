"""The pydantic -> structural schema converter, on small models of its own."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import Field, ValidationError

from imagegen_operator.schema import KubeModel, Rule, StatusModel, defaulted, structural_schema


class Inner(KubeModel):
    """Inner's own description."""

    size_gib: int = Field(default=2, ge=1)
    """Size in GiB."""

    rules = (
        Rule(
            cel="self.sizeGib != 3",
            check=lambda m: m.size_gib != 3,
            field=".sizeGib",
            message="sizeGib must not be 3",
        ),
    )


class Outer(KubeModel):
    """Outer."""

    inner: Inner = defaulted()
    """The field's description wins over the class's."""
    maybe: Inner | None = None
    """Optional inner."""
    ratio: float | None = Field(default=None, gt=0, lt=1)
    """A ratio."""
    mode: Literal["A", "B"] = "A"
    """A mode."""
    fixed: Literal["only"] = "only"
    """A constant."""
    names: list[str] = Field(default_factory=list, max_length=3)
    """Names."""


def test_refs_are_inlined_and_field_descriptions_win():
    schema = structural_schema(Outer)
    inner = schema["properties"]["inner"]
    assert inner["description"] == "The field's description wins over the class's."
    assert inner["default"] == {}
    assert inner["properties"]["sizeGib"]["minimum"] == 1
    assert "$ref" not in str(schema) and "$defs" not in schema


def test_optional_is_the_plain_type_without_null():
    maybe = structural_schema(Outer)["properties"]["maybe"]
    assert maybe["type"] == "object"
    assert "anyOf" not in maybe and "default" not in maybe and "nullable" not in maybe
    assert "maybe" not in structural_schema(Outer).get("required", [])


def test_exclusive_bounds_become_openapi_v3_booleans():
    ratio = structural_schema(Outer)["properties"]["ratio"]
    assert (ratio["minimum"], ratio["exclusiveMinimum"]) == (0, True)
    assert (ratio["maximum"], ratio["exclusiveMaximum"]) == (1, True)


def test_enums_consts_and_lists():
    props = structural_schema(Outer)["properties"]
    assert props["mode"]["enum"] == ["A", "B"]
    assert props["fixed"]["enum"] == ["only"] and "const" not in props["fixed"]
    assert props["names"] == {
        "description": "Names.",
        "type": "array",
        "maxItems": 3,
        "items": {"type": "string"},
    }


def test_defaults_are_named_in_the_description():
    props = structural_schema(Outer)["properties"]
    assert props["mode"]["description"] == "A mode. Defaults to A."
    assert props["inner"]["properties"]["sizeGib"]["description"] == "Size in GiB. Defaults to 2."


def test_rules_become_x_kubernetes_validations():
    inner = structural_schema(Outer)["properties"]["inner"]
    assert inner["x-kubernetes-validations"] == [
        {"rule": "self.sizeGib != 3", "message": "sizeGib must not be 3", "fieldPath": ".sizeGib"}
    ]


def test_python_runs_the_same_rule_with_its_field_path():
    with pytest.raises(ValidationError) as err:
        Outer.model_validate({"inner": {"sizeGib": 3}})
    (error,) = err.value.errors()
    assert error["loc"] == ("inner",)
    assert error["msg"] == "sizeGib must not be 3"
    assert error["ctx"] == {"field_path": ".sizeGib"}


def test_defaulted_objects_are_validated_like_the_server_does():
    assert Outer().inner.size_gib == 2


def test_spec_models_are_strict_and_closed_status_models_are_not():
    with pytest.raises(ValidationError):
        Inner.model_validate({"sizeGib": "2"})
    with pytest.raises(ValidationError):
        Inner.model_validate({"sizeGib": 2, "extra": 1})

    class Observed(StatusModel):
        count: int | None = None
        """A count."""

    assert Observed.model_validate({"count": "2", "newer": True}).count == 2


def test_unions_without_a_structural_form_are_refused():
    class Ambiguous(KubeModel):
        value: int | bool = 1
        """Either."""

    with pytest.raises(ValueError, match="no structural form"):
        structural_schema(Ambiguous)
