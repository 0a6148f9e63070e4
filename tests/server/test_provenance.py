"""Every PNG says how it was made and that a model made it, unless switched off."""

from __future__ import annotations

import base64
import datetime
import http.server
import io
import json
import re
import threading
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import c2pa
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from server_testlib import source_image

from imagegen_server import provenance
from imagegen_server.api import ConfigError, create_app
from imagegen_server.provenance import (
    COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
    SOFTWARE,
    TRAINED_ALGORITHMIC_MEDIA,
    ManifestSigner,
    SigningError,
    levers,
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


def signing_chain(directory: Path, valid_for: datetime.timedelta = datetime.timedelta(days=30),
                  key_format: str = "PKCS8") -> tuple[Path, Path]:
    """A test CA and an ES256 leaf it issued (PEM chain, leaf first, and the leaf's key in
    ``key_format``): what an organisation's signing certificate looks like to C2PA, minus
    the trust list. The leaf expires ``valid_for`` from now."""
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
                   .not_valid_after(now + (max(valid_for, datetime.timedelta(days=30)) if ca
                                           else valid_for))
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
    key.write_bytes(leaf_key.private_bytes(pem, getattr(serialization.PrivateFormat, key_format),
                                           serialization.NoEncryption()))
    return cert, key


def serial_of(cert: Path) -> str:
    """The leaf's serial number, as c2pa's report gives it."""
    from cryptography import x509

    return str(x509.load_pem_x509_certificate(cert.read_bytes()).serial_number)


def signed_by(png: bytes) -> str:
    state, report = read_manifest(png)
    assert state == "Valid", report.get("validation_status")
    return report["manifests"][report["active_manifest"]]["signature_info"]["cert_serial_number"]


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
    with signer._signers.borrowed(), ThreadPoolExecutor(max_workers=3) as pool:
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



@pytest.fixture
def listener():
    """An HTTP server on 127.0.0.1 that records each request's path and answers 404."""
    seen: list[str] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", seen
    server.shutdown()
    thread.join()


def test_an_upload_naming_a_remote_manifest_sends_no_request_there(client_for, tmp_path,
                                                                    listener):
    """An upload's XMP may name its manifest by address: the server fetches nothing (that
    would be a request from the pod to wherever a client points) and names the decoded
    picture as the parent, once per request however many images it makes."""
    address, seen = listener
    cert, key = signing_chain(tmp_path)
    client = client_for(c2pa_cert_file=str(cert), c2pa_key_file=str(key))
    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/'
           '02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" xmlns:dcterms="http://purl.'
           f'org/dc/terms/" dcterms:provenance="{address}/manifest.c2pa"/></rdf:RDF>'
           '</x:xmpmeta>')
    info = PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp)
    upload = io.BytesIO()
    source_image().save(upload, format="PNG", pnginfo=info)
    # c2pa at its defaults would fetch it: the test can tell.
    with pytest.raises(c2pa.C2paError), c2pa.Reader("image/png", io.BytesIO(upload.getvalue())):
        pass
    assert seen == ["/manifest.c2pa"]
    seen.clear()
    response = client.post(EDITS, data={"prompt": "x", "seed": "1", "n": "2"},
                           files={"image": ("i.png", upload.getvalue(), "image/png")})
    for item in response.json()["data"]:
        state, report = read_manifest(base64.b64decode(item["b64_json"]))
        assert state == "Valid"
        (parent,) = report["manifests"][report["active_manifest"]]["ingredients"]
        assert (parent["relationship"], parent["format"]) == ("parentOf", "image/png")
    assert seen == []


def test_a_signed_edit_reads_its_upload_once_however_many_images(client_for, tmp_path,
                                                                   monkeypatch):
    cert, key = signing_chain(tmp_path)
    client = client_for(c2pa_cert_file=str(cert), c2pa_key_file=str(key))
    reads = []

    class CountingReader(c2pa.Reader):
        def __init__(self, *args, **kwargs):
            reads.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(c2pa, "Reader", CountingReader)
    buffer = io.BytesIO()
    source_image().save(buffer, format="JPEG", quality=95)
    response = client.post(EDITS, data={"prompt": "x", "seed": "1", "n": "3"},
                           files={"image": ("i.jpg", buffer.getvalue(), "image/jpeg")})
    assert response.status_code == 200 and len(response.json()["data"]) == 3
    assert reads == ["image/jpeg"]


def test_a_renewed_certificate_signs_without_a_restart(tmp_path, caplog):
    """cert-manager renews the Secret and the kubelet swaps the files: the next signature
    is the new pair's. A pair that cannot sign (here one already expired) is logged, and
    the old pair signs on."""
    cert, key = signing_chain(tmp_path)
    first = serial_of(cert)
    signer = ManifestSigner(cert, key)
    blank = _blank_png()
    assert signed_by(signer.sign(blank, None)) == first
    for name, valid_for in (("stale", -datetime.timedelta(hours=1)),
                            ("renewed", datetime.timedelta(days=30))):
        (tmp_path / name).mkdir()
        pair = signing_chain(tmp_path / name, valid_for=valid_for)
        cert.write_bytes(pair[0].read_bytes())
        key.write_bytes(pair[1].read_bytes())
        if name == "stale":
            assert signed_by(signer.sign(blank, None)) == first
            assert "cannot sign" in caplog.text and signer.check() is None
    assert signed_by(signer.sign(blank, None)) == serial_of(cert)


def test_a_renewal_that_failed_for_a_moment_is_tried_again(tmp_path, monkeypatch):
    """The new pair's test signature may fail for a passing reason (the timestamp server
    down as the files changed): the same files are tried again, not only on a next change
    that may never come."""
    cert, key = signing_chain(tmp_path)
    signer = ManifestSigner(cert, key)
    sign_with, tries = signer._sign_with, []

    def down_once(signers, png, record, parent):
        tries.append(png)
        if len(tries) == 1:
            raise c2pa.C2paError("timestamp server unreachable")
        return sign_with(signers, png, record, parent)

    monkeypatch.setattr(signer, "_sign_with", down_once)
    (tmp_path / "next").mkdir()
    renewed = signing_chain(tmp_path / "next")
    cert.write_bytes(renewed[0].read_bytes())
    key.write_bytes(renewed[1].read_bytes())
    blank = _blank_png()
    assert signed_by(signer.sign(blank, None)) != serial_of(cert)  # the failed try
    assert signed_by(signer.sign(blank, None)) != serial_of(cert)  # not before RETRY_S
    assert len(tries) == 3  # one test signature, two signatures
    signer._retry_at = 0.0  # RETRY_S later
    assert signed_by(signer.sign(blank, None)) == serial_of(cert)


def test_an_expired_certificate_refuses_before_the_gpu_work_until_renewed(
        client_for, tmp_path, monkeypatch):
    """Once the chain in use has expired, c2pa would refuse every signature, after each
    request's GPU work: the server refuses up front instead, and /readyz takes the pod out
    of service, until a renewed pair is read."""
    cert, key = signing_chain(tmp_path)
    client = client_for(c2pa_cert_file=str(cert), c2pa_key_file=str(key))
    body = {"prompt": "x", "size": "64x64", "seed": 4}
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=31)
    monkeypatch.setattr(provenance, "_now", lambda: later)
    assert client.get("/readyz").status_code == 503
    response = client.post(GENERATE, json=body)
    assert response.status_code == 503, response.text
    assert "cannot be signed: the signing certificate expired" in response.json()["error"][
        "message"]
    assert "imagegen_images_generated_total 0.0" in client.get("/metrics").text
    (tmp_path / "next").mkdir()
    renewed = signing_chain(tmp_path / "next", valid_for=datetime.timedelta(days=60))
    cert.write_bytes(renewed[0].read_bytes())
    key.write_bytes(renewed[1].read_bytes())
    assert client.get("/readyz").status_code == 200
    response = client.post(GENERATE, json=body)
    assert signed_by(base64.b64decode(response.json()["data"][0]["b64_json"])) == serial_of(
        cert)


@pytest.mark.parametrize("key_format", ["TraditionalOpenSSL", "PKCS8"])
def test_a_key_in_sec1_or_pkcs8_signs(tmp_path, key_format):
    """cert-manager writes an EC key as SEC1 (BEGIN EC PRIVATE KEY) by default; c2pa reads
    PKCS#8 only, so the server converts it."""
    cert, key = signing_chain(tmp_path, key_format=key_format)
    header = b"EC PRIVATE KEY" if key_format == "TraditionalOpenSSL" else b"BEGIN PRIVATE KEY"
    assert header in key.read_bytes()
    assert signed_by(ManifestSigner(cert, key).sign(_blank_png(), None)) == serial_of(cert)


def test_a_key_that_is_not_one_names_its_file(tmp_path):
    cert, key = signing_chain(tmp_path)
    key.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    with pytest.raises(SigningError, match=re.escape(f"{key} holds no unencrypted PEM")):
        ManifestSigner(cert, key)


def _blank_png() -> bytes:
    blank = io.BytesIO()
    Image.new("RGB", (16, 16), "white").save(blank, format="PNG")
    return blank.getvalue()


def test_the_record_names_the_denoisers_quantization_and_cache(make_runtime):
    """Both change the image a seed makes: the record says which the server ran with."""
    from fastapi.testclient import TestClient

    runtime = make_runtime("flux", quantization="Int8WeightOnly", cache="FirstBlockCache",
                           cache_threshold=0.3, default_steps=2, default_width=64,
                           default_height=64)
    with TestClient(create_app(runtime.settings, runtime)) as client:
        (image,) = pngs(client.post(GENERATE, json={"prompt": "x", "seed": 2}))
    record = json.loads(image.text["parameters"])
    assert record["quantization"] == "Int8WeightOnly"
    assert record["cache"] == {"method": "FirstBlockCache", "threshold": 0.3}
    settings = runtime.settings.model_validate(runtime.settings.model_dump() | {
        "cache": "TaylorSeerCache", "cache_interval": 3, "quantization": "None"})
    assert levers(settings) == {"cache": {"method": "TaylorSeerCache", "interval": 3}}
