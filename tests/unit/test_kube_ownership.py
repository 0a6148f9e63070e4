"""Which field managers hold something of a pod template the operator owns."""

from __future__ import annotations

from imagegen_operator.kube import FIELD_MANAGER, _split_kept, foreign_template_managers


def deployment(*entries: tuple[str, dict]) -> dict:
    return {"metadata": {"managedFields": [
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
    assert foreign_template_managers(deployment(OURS, CONTROLLER)) == []
    assert foreign_template_managers(deployment(OURS, CONTROLLER, RESTART)) == []
    assert foreign_template_managers(deployment(OURS, HAND, RESTART)) == ["kubectl-patch"]


def test_a_restart_stamp_is_split_off_and_leaves_no_claim_on_the_whole_map() -> None:
    template = {"f:metadata": {"f:annotations": {
        ".": {}, "f:kubectl.kubernetes.io/restartedAt": {}}}, "f:spec": {"f:x": {}}}
    kept = _split_kept(template)
    assert kept == {"f:metadata": {"f:annotations": {"f:kubectl.kubernetes.io/restartedAt": {}}}}
    # What is left to take over: the spec field, not an empty "annotations" claim.
    assert template == {"f:spec": {"f:x": {}}}
