"""Every PNG says how it was made and that a model made it, unless switched off."""

from __future__ import annotations

import base64
import io
import json
import xml.etree.ElementTree as ET

from PIL import Image
from server_testlib import source_image

from imagegen_server.provenance import SOFTWARE, TRAINED_ALGORITHMIC_MEDIA

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
    assert digital_source_type(image) == TRAINED_ALGORITHMIC_MEDIA


def test_switched_off_the_pngs_carry_nothing(client_for):
    client = client_for(provenance=False)
    (image,) = pngs(client.post(GENERATE, json={"prompt": "x", "size": "64x64"}))
    assert "parameters" not in image.info and "XML:com.adobe.xmp" not in image.info
    assert not getattr(image, "text", {})
