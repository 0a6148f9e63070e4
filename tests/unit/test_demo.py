"""`make demo`'s choice of examples and the claims it makes for them (the demo itself runs a
control plane; this checks what it will apply, in milliseconds)."""

from __future__ import annotations

from pathlib import Path

import demo
import yaml

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_every_local_service_of_every_example_file_is_applied():
    picked = [doc["metadata"]["name"] for _, doc in demo.local_examples()]
    expected = [
        doc["metadata"]["name"]
        for path in sorted(EXAMPLES.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc["spec"].get("nodePool", {}).get("provider") == "Local"
    ]
    assert picked == expected
    assert {"sdxl-int8", "flux-fp8-cached"} <= set(picked)  # two services in one file


def test_each_claim_a_local_service_mounts_is_made_and_bound():
    services = [doc for _, doc in demo.local_examples()]
    claims = set().union(*(demo.claims_of(doc) for doc in services))
    assert {"models", "sdxl-compile-cache"} <= claims
    objects = demo.volumes(claims)
    pvcs = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PersistentVolumeClaim"}
    pvs = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PersistentVolume"}
    assert set(pvcs) == claims
    for name, pvc in pvcs.items():
        pv = pvs[pvc["spec"]["volumeName"]]
        assert pv["spec"]["claimRef"] == {"namespace": "default", "name": name}


def test_each_secret_a_local_service_reads_its_token_from_is_made_with_a_fresh_token():
    services = [doc for _, doc in demo.local_examples()]
    refs = {(s["spec"]["server"]["authSecretRef"]["name"], s["spec"]["server"]["authSecretRef"]["key"])
            for s in services if (s["spec"].get("server") or {}).get("authSecretRef")}
    assert refs, "the Local examples ask for a token"
    made = demo.secrets_of(services)
    assert {(o["metadata"]["name"], key) for o in made for key in o["stringData"]} == refs
    again = demo.secrets_of(services)
    assert [o["stringData"] for o in made] != [o["stringData"] for o in again]
    assert all(len(token) == 64 for o in made for token in o["stringData"].values())
