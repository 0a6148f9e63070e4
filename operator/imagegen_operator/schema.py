"""Pydantic models -> Kubernetes structural OpenAPI v3 schemas, and rules that run in both.

The models in ``api.py`` are the one source of truth. A cross-field rule is
written once as a :class:`Rule`: a CEL expression for the API server and the
same check in Python for objects that never went through this CRD (created
before an upgrade, rendered offline). Both report the same message at the
same field path.

:func:`structural_schema` rewrites pydantic's JSON Schema into what the API
server accepts as a structural schema: ``$ref`` inlined, ``anyOf [X, null]``
collapsed to ``X``, int-or-string marked as such, JSON Schema 2020 exclusive
bounds turned into the OpenAPI v3 boolean form, and keys Kubernetes rejects
(``title``, ``additionalProperties: false``) dropped. Unknown fields are then
pruned by the server and refused by ``kubectl apply``'s strict validation.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

Reason = Literal["FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired"]


@dataclass(frozen=True)
class Rule:
    """One cross-field rule, evaluated on the object it is attached to (``self``)."""

    cel: str
    check: Callable[[Any], bool]  # the same rule in Python; True means valid
    field: str  # path of the offending field relative to the object, e.g. ".partitionSize"
    message: str  # a sentence for the user; the field path is put in front of it
    reason: Reason = "FieldValueInvalid"

    def x_kubernetes_validation(self) -> dict[str, str]:
        entry = {"rule": self.cel, "message": self.message, "fieldPath": self.field}
        if self.reason != "FieldValueInvalid":
            entry["reason"] = self.reason
        return entry


def _add_rules(schema: dict[str, Any], cls: type[KubeModel]) -> None:
    if cls.rules:
        schema["x-kubernetes-validations"] = [r.x_kubernetes_validation() for r in cls.rules]


class KubeModel(BaseModel):
    """Base of the API models: camelCase on the wire, attribute docstrings as descriptions.

    Spec models are strict and forbid unknown fields, as the API server does; status
    models relax that (see :class:`StatusModel`).
    """

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        alias_generator=to_camel,
        use_attribute_docstrings=True,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        json_schema_extra=_add_rules,
    )
    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> KubeModel:
        for rule in self.rules:
            if not rule.check(self):
                # Only the first broken rule is reported: a validator raises one error.
                raise PydanticCustomError("rule", rule.message, {"field_path": rule.field})
        return self


class StatusModel(KubeModel):
    """Status is written by the operator; a newer operator may add fields an older one reads."""

    model_config = ConfigDict(extra="ignore", strict=False)


def defaulted() -> Any:
    """A nested object that defaults to ``{}`` so the server fills in its fields' defaults.

    Python validates the same ``{}``. The API server checks the bare ``{}`` against the
    object's CEL rules when the CRD is created (before nested defaults), so such an
    object's rules must hold for ``{}``.
    """
    return Field(default_factory=dict, validate_default=True, json_schema_extra={"default": {}})


# Keys pydantic emits that a structural schema does not take (or that mean nothing to it).
_DROP = ("title",)


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a model, as the API server wants it."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _rewrite(raw, defs)


def _rewrite(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = dict(node)
    if "anyOf" in node:
        node = _collapse_any_of(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").rsplit("/", 1)[-1]])
        # Keys beside the $ref (the field's description, its default) win over the class's.
        node = {**target, **node}
    if node.get("default", ...) is None:
        del node["default"]
    if "description" in node:
        # Docstrings wrap at the code's line length; descriptions are one paragraph.
        node["description"] = " ".join(node["description"].split())
    if "description" in node and node.get("default") not in (None, {}, ""):
        # kubectl explain does not print `default`; say it in the text it does print.
        node["description"] += f" Defaults to {_literal(node['default'])}."
    for key in _DROP:
        node.pop(key, None)
    if node.get("additionalProperties") is False:
        del node["additionalProperties"]
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), int | float) and not isinstance(node[bound], bool):
            node[plain] = node[bound]
            node[bound] = True
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "properties" in node:
        node["properties"] = {k: _rewrite(v, defs) for k, v in node["properties"].items()}
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _rewrite(node["additionalProperties"], defs)
    if "items" in node:
        node["items"] = _rewrite(node["items"], defs)
    return _ordered(node)


# Reading order in the generated YAML: what a field is, then its constraints, then children.
_FIRST = ("description", "type")
_LAST = ("properties", "additionalProperties", "items", "required", "x-kubernetes-validations")


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    middle = sorted(k for k in node if k not in _FIRST and k not in _LAST)
    return {k: node[k] for k in (*_FIRST, *middle, *_LAST) if k in node}


def _literal(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)


def _collapse_any_of(node: dict[str, Any]) -> dict[str, Any]:
    options = node.pop("anyOf")
    non_null = [o for o in options if o.get("type") != "null"]
    types = sorted(o.get("type", "") for o in non_null)
    if len(non_null) == 1:
        # Optional[X]: an absent field is the API's "not set"; no nullable needed.
        return {**non_null[0], **node}
    if types == ["integer", "string"]:
        # int | str is Kubernetes' int-or-string (resource quantities); string
        # constraints move up beside the marker, as in the built-in types.
        string = next(o for o in non_null if o["type"] == "string")
        extra = {k: v for k, v in string.items() if k != "type"}
        return {
            **node,
            **extra,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
        }
    raise ValueError(f"no structural form for anyOf {options!r}")
