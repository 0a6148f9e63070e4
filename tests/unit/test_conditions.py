"""Condition bookkeeping: transition times, observedGeneration, kstatus' pair."""

import pytest

from imagegen_operator import conditions as cond

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def test_transition_time_moves_only_when_the_status_flips():
    first = cond.merge(None, [cond.Observed(cond.READY, False, "ReplicasNotReady", "0/2")], 1, T0)
    same = cond.merge(first, [cond.Observed(cond.READY, False, "ReplicasNotReady", "1/2")], 2, T1)
    flipped = cond.merge(same, [cond.Observed(cond.READY, True, "Ready", "2/2")], 2, T1)
    assert first[0]["lastTransitionTime"] == T0
    assert same[0]["lastTransitionTime"] == T0  # reason and message changed, status did not
    assert (same[0]["message"], same[0]["observedGeneration"]) == ("1/2", 2)
    assert flipped[0]["lastTransitionTime"] == T1
    assert flipped[0]["status"] == "True"


def test_conditions_come_in_a_stable_order_with_ready_first():
    observed = [cond.Observed(t, True, "X") for t in reversed(cond.ORDER)]
    assert [c["type"] for c in cond.merge(None, observed, 1, T0)] == list(cond.ORDER)


@pytest.mark.parametrize(
    "ready, stalled, reconciling_status, stalled_status",
    [
        (cond.Observed(cond.READY, True, "Ready"), False, "False", "False"),
        (cond.Observed(cond.READY, False, "Provisioning", "creating"), False, "True", "False"),
        (cond.Observed(cond.READY, False, "QuotaExceeded", "quota"), True, "False", "True"),
    ],
    ids=["ready", "on-its-way", "stalled"],
)
def test_kstatus_pair_follows_ready(ready, stalled, reconciling_status, stalled_status):
    reconciling, stalled_cond = cond.kstatus(ready, stalled)
    assert (reconciling.type, stalled_cond.type) == (cond.RECONCILING, cond.STALLED)
    assert reconciling.status_text == reconciling_status
    assert stalled_cond.status_text == stalled_status
    if stalled:
        assert (stalled_cond.reason, stalled_cond.message) == (ready.reason, ready.message)
