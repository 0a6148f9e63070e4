"""Which field managers hold something where the operator owns a kind whole."""

from __future__ import annotations

from imagegen_operator.kube import FIELD_MANAGER, _split_kept, _take, foreign_managers


def deployment(*entries: tuple[str, dict], kind: str = "Deployment") -> dict:
    return {"kind": kind, "metadata": {"managedFields": [
        {"manager": m, "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": f}
        for m, f in entries]}}


OURS = (FIELD_MANAGER, {"f:spec": {"f:template": {"f:spec": {"f:nodeSelector": {
    "f:cloud.google.com/gke-accelerator": {}}}}}})
CONTROLLER = ("kube-controller-manager", {
    "f:metadata": {"f:annotations": {"f:deployment.kubernetes.io/revision": {}}},
    "f:status": {"f:replicas": {}}})
RESTART = ("kubectl-rollout", {"f:spec": {"f:template": {"f:metadata": {"f:annotations": {
    ".": {}, "f:kubectl.kubernetes.io/restartedAt": {}}}}}})
HAND = ("kubectl-patch", {"f:spec": {"f:template": {"f:spec": {"f:nodeSelector": {
    "f:disk": {}}}}}})


def test_only_other_managers_template_fields_count() -> None:
    assert foreign_managers(deployment(OURS, CONTROLLER)) == []
    assert foreign_managers(deployment(OURS, CONTROLLER, RESTART)) == []
    assert foreign_managers(deployment(OURS, HAND, RESTART)) == ["kubectl-patch"]


def test_a_restart_stamp_is_split_off_and_leaves_no_claim_on_the_whole_map() -> None:
    template = {"f:metadata": {"f:annotations": {
        ".": {}, "f:kubectl.kubernetes.io/restartedAt": {}}}, "f:spec": {"f:x": {}}}
    kept = _split_kept(template)
    assert kept == {"f:metadata": {"f:annotations": {"f:kubectl.kubernetes.io/restartedAt": {}}}}
    # What is left to take over: the spec field, not an empty "annotations" claim.
    assert template == {"f:spec": {"f:x": {}}}


def test_a_selector_key_added_by_hand_counts_where_the_kind_is_ours_whole() -> None:
    # A LabelSelector is an atomic struct: whoever wrote it last owns it whole.
    ours = (FIELD_MANAGER, {"f:spec": {"f:policyTypes": {}}})
    hand = ("kubectl-patch", {"f:spec": {"f:podSelector": {}}})
    labels = ("kubectl-label", {"f:metadata": {"f:labels": {"f:team": {}}}})
    assert foreign_managers(deployment(ours, hand, kind="NetworkPolicy")) == ["kubectl-patch"]
    assert foreign_managers(deployment(ours, labels, kind="NetworkPolicy")) == []
    # A Service is ours whole only in its selector, an atomic map; the same template edit
    # on a Job is not taken over (its template cannot change).
    port = ("kubectl-patch", {"f:spec": {"f:ports": {}}})
    selector = ("kubectl-patch", {"f:spec": {"f:selector": {}}})
    assert foreign_managers(deployment(port, kind="Service")) == []
    assert foreign_managers(deployment(selector, kind="Service")) == ["kubectl-patch"]
    assert foreign_managers(deployment(OURS, HAND, kind="Job")) == []


def test_taking_a_field_set_leaves_no_empty_map_behind() -> None:
    fields = {"f:metadata": {"f:labels": {"f:team": {}}},
              "f:spec": {"f:selector": {"f:x": {}}}}
    assert _take(fields, ("f:spec", "f:selector")) == {"f:x": {}}
    assert fields == {"f:metadata": {"f:labels": {"f:team": {}}}}
    fields = {"f:spec": {"f:ports": {}, "f:selector": {"f:x": {}}}}
    assert _take(fields, ("f:spec", "f:selector")) == {"f:x": {}}
    assert fields == {"f:spec": {"f:ports": {}}}
    assert _take(fields, ("f:spec", "f:template")) is None
    assert fields == {"f:spec": {"f:ports": {}}}
    fields = {"f:spec": {"f:selector": {}}}
    assert _take(fields, ("f:spec", "f:selector")) == {}
    assert fields == {}
