"""Every PNG says how it was made and that a model made it, unless switched off."""

from __future__ import annotations

import base64
import datetime
import io
import json
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import c2pa
import pytest
from PIL import Image
from server_testlib import source_image

from imagegen_server.api import ConfigError, create_app
from imagegen_server.provenance import (
    COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
    SOFTWARE,
    TRAINED_ALGORITHMIC_MEDIA,
    ManifestSigner,
)

GENERATE, EDITS = "/v1/images/generations", "/v1/images/edits"
IPTC = "{http://iptc.org/std/Iptc4xmpExt/2008-02-29/}"


def pngs(response) -> list[Image.Image]:
    assert response.status_code == 200, response.text
    return [Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
            for item in response.json()["data"]]


def digital_source_type(image: Image.Image) -> str:
    root = ET.fromstring(image.info["XML:com.adobe.xmp"])
    (description,) = root.iter("{http://www.w3.org/1999/02/22-rdf-syntax-ns#}Description")
    return description.attrib[f"{IPTC}DigitalSourceType"]


def test_generations_carry_their_parameters_and_the_ai_source_type(client_for):
    client = client_for()
    body = {"prompt": "a lighthouse, \u00e0 la Turner", "n": 2, "size": "64x64", "seed": 11,
            "steps": 2, "guidance_scale": 3.5, "negative_prompt": "fog"}
    images = pngs(client.post(GENERATE, json=body))
    records = [json.loads(image.text["parameters"]) for image in images]
    assert records[0] == {
        "model": "sd15", "prompt": body["prompt"], "negative_prompt": "fog", "seed": 11,
        "image_index": 0, "steps": 2, "guidance_scale": 3.5, "size": "64x64",
    }
    assert records[1]["image_index"] == 1
    assert all(image.text["Software"] == SOFTWARE for image in images)
    assert {digital_source_type(image) for image in images} == {TRAINED_ALGORITHMIC_MEDIA}


def test_edits_record_strength_and_mask(client_for):
    client = client_for()
    buffer = io.BytesIO()
    source_image().save(buffer, format="PNG")
    response = client.post(EDITS, data={"prompt": "x", "strength": "0.5", "seed": "3"},
                           files={"image": ("i.png", buffer.getvalue(), "image/png")})
    (image,) = pngs(response)
    record = json.loads(image.text["parameters"])
    assert record["edit"] == {"strength": 0.5, "masked": False} and record["seed"] == 3
    # The upload composited with a model's work, as IPTC names it.
    assert digital_source_type(image) == COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA


def test_switched_off_the_pngs_carry_nothing(client_for):
    client = client_for(provenance=False)
    (image,) = pngs(client.post(GENERATE, json={"prompt": "x", "size": "64x64"}))
    assert "parameters" not in image.info and "XML:com.adobe.xmp" not in image.info
    assert not getattr(image, "text", {})


def signing_chain(directory: Path) -> tuple[Path, Path]:
    """A test CA and an ES256 leaf it issued (PEM chain, leaf first, and the leaf's key):
    what an organisation's signing certificate looks like to C2PA, minus the trust list."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "imagegen tests")])

    def usage(**allowed) -> x509.KeyUsage:
        flags = dict.fromkeys(["digital_signature", "content_commitment", "key_encipherment",
                               "data_encipherment", "key_agreement", "key_cert_sign",
                               "crl_sign", "encipher_only", "decipher_only"], False)
        return x509.KeyUsage(**(flags | allowed))

    now = datetime.datetime.now(datetime.UTC)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())

    def issue(subject, key, ca: bool):
        builder = (x509.CertificateBuilder().subject_name(name(subject))
                   .issuer_name(name("imagegen test CA")).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            builder = builder.add_extension(usage(key_cert_sign=True, crl_sign=True), True)
        else:
            # C2PA's certificate profile: a signing leaf with the key identifiers.
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
            builder = (builder.add_extension(usage(digital_signature=True), True)
                       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]),
                                      False)
                       .add_extension(aki, False)
                       .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                      False))
        return builder.sign(ca_key, hashes.SHA256())

    pem = serialization.Encoding.PEM
    cert, key = directory / "tls.crt", directory / "tls.key"
    cert.write_bytes(issue("imagegen-server", leaf_key, False).public_bytes(pem)
                     + issue("imagegen test CA", ca_key, True).public_bytes(pem))
    key.write_bytes(leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert, key


def read_manifest(png: bytes) -> tuple[str, dict]:
    with c2pa.Reader("image/png", io.BytesIO(png)) as reader:
        return reader.get_validation_state(), json.loads(reader.json())


def test_a_signing_certificate_adds_a_c2pa_manifest_that_c2pa_reads(client_for, tmp_path):
    cert, key = signing_chain(tmp_path)
    client = client_for(c2pa_cert_file=str(cert), c2pa_key_file=str(key))
    response = client.post(GENERATE, json={"prompt": "x", "size": "64x64", "seed": 4})
    png = base64.b64decode(response.json()["data"][0]["b64_json"])
    state, report = read_manifest(png)
    assert state == "Valid"  # signed and intact; the test CA is on no trust list:
    assert {s["code"] for s in report.get("validation_status", [])} <= {
        "signingCredential.untrusted"}
    manifest = report["manifests"][report["active_manifest"]]
    (actions,) = [a["data"]["actions"] for a in manifest["assertions"]
                  if a["label"].startswith("c2pa.actions")]
    assert actions[0]["action"] == "c2pa.created"
    assert actions[0]["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    assert manifest["signature_info"]["common_name"] == "imagegen-server"
    # The text chunks are still there, and the pixels are the ones generated.
    image = Image.open(io.BytesIO(png))
    assert json.loads(image.text["parameters"])["seed"] == 4
    # One changed pixel byte breaks the signed hash.
    tampered = bytearray(png)
    tampered[png.index(b"IDAT") + 12] ^= 0xFF
    state, report = read_manifest(bytes(tampered))
    assert state == "Invalid"
    assert "assertion.dataHash.mismatch" in {s["code"] for s in report["validation_status"]}


def test_a_signature_in_progress_does_not_hold_up_another(tmp_path):
    """A signature may wait on a timestamp server's round trip: others sign meanwhile, each
    with a native signer of its own, and every manifest is whole."""
    signer = ManifestSigner(*signing_chain(tmp_path))
    blank = io.BytesIO()
    Image.new("RGB", (16, 16), "white").save(blank, format="PNG")
    # One signature still under way holds its signer while three threads sign six more.
    with signer._borrowed(), ThreadPoolExecutor(max_workers=3) as pool:
        signed = list(pool.map(lambda _: signer.sign(blank.getvalue(), None), range(6),
                               timeout=60))
    assert [read_manifest(png)[0] for png in signed] == ["Valid"] * 6
    assert 2 <= signer.signers_made <= 4  # the one held, and one per thread at most


def test_a_certificate_that_cannot_sign_stops_the_server(make_runtime, tmp_path):
    cert, key = signing_chain(tmp_path)
    (tmp_path / "other").mkdir()
    other = signing_chain(tmp_path / "other")
    runtime = make_runtime("sd15", warmup=False)
    settings = runtime.settings.model_copy(update={"c2pa_cert_file": cert,
                                                   "c2pa_key_file": other[1]})
    with pytest.raises(ConfigError, match="cannot sign"):
        create_app(settings, runtime)
    settings = runtime.settings.model_copy(update={"c2pa_cert_file": tmp_path / "missing",
                                                   "c2pa_key_file": key})
    with pytest.raises(ConfigError, match="cannot read"):
        create_app(settings, runtime)


def test_a_signed_edit_names_the_upload_as_its_parent(client_for, tmp_path):
    cert, key = signing_chain(tmp_path)
    client = client_for(c2pa_cert_file=str(cert), c2pa_key_file=str(key))
    buffer = io.BytesIO()
    source_image().save(buffer, format="JPEG", quality=95)
    response = client.post(EDITS, data={"prompt": "x", "seed": "1"},
                           files={"image": ("i.jpg", buffer.getvalue(), "image/jpeg")})
    png = base64.b64decode(response.json()["data"][0]["b64_json"])
    state, report = read_manifest(png)
    assert state == "Valid"
    manifest = report["manifests"][report["active_manifest"]]
    (actions,) = [a["data"]["actions"] for a in manifest["assertions"]
                  if a["label"].startswith("c2pa.actions")]
    assert [a["action"] for a in actions] == ["c2pa.opened", "c2pa.edited"]
    assert actions[1]["digitalSourceType"] == COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA
    (parent,) = manifest["ingredients"]
    # The file as sent (a JPEG, not the server's PNG of it), and no picture of it inside.
    assert (parent["relationship"], parent["format"]) == ("parentOf", "image/jpeg")
    assert "thumbnail" not in parent and "thumbnail" not in manifest


def test_an_upload_signed_by_someone_else_brings_no_picture_of_it_along(client_for, tmp_path):
    """A camera's or another generator's manifest carries a thumbnail of the picture: an
    edit of such a file names the decoded picture as its parent, and no manifest in the
    result holds a thumbnail."""
    cert, key = signing_chain(tmp_path)
    client = client_for(c2pa_cert_file=str(cert), c2pa_key_file=str(key))
    camera = c2pa.Signer.from_info(c2pa.C2paSignerInfo(
        c2pa.C2paSigningAlg.ES256, cert.read_bytes(), key.read_bytes(), None))
    plain = io.BytesIO()
    source_image().save(plain, format="PNG")
    upload = io.BytesIO()
    manifest = {"claim_generator_info": [{"name": "a camera", "version": "1"}],
                "format": "image/png", "assertions": [{"label": "c2pa.actions", "data": {
                    "actions": [{"action": "c2pa.created", "digitalSourceType":
                                 "http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture"}]}}]}
    with c2pa.Builder(manifest) as builder:  # c2pa's defaults: with a thumbnail
        builder.sign(camera, "image/png", io.BytesIO(plain.getvalue()), upload)
    assert "thumbnail" in next(iter(read_manifest(upload.getvalue())[1]["manifests"].values()))
    response = client.post(EDITS, data={"prompt": "x", "seed": "1"},
                           files={"image": ("i.png", upload.getvalue(), "image/png")})
    png = base64.b64decode(response.json()["data"][0]["b64_json"])
    state, report = read_manifest(png)
    assert state == "Valid"
    for manifest in report["manifests"].values():
        assert "thumbnail" not in manifest
        assert all("thumbnail" not in i for i in manifest.get("ingredients", []))

