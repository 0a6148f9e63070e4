"""POST /v1/images/edits over HTTP: the official openai client, and every bad upload refused
with a 400 naming its field before any device work."""

from __future__ import annotations

import base64
import gc
import io
import weakref

import numpy as np
import openai
import pytest
from PIL import Image, PngImagePlugin
from server_testlib import count_calls, left_half_mask, mean_abs_diff, source_image

from imagegen_server import api
from imagegen_server.request import EditInput

EDITS = "/v1/images/edits"


def png(image: Image.Image) -> bytes:
    return encoded("PNG", image)


def encoded(image_format: str, image: Image.Image | None = None) -> bytes:
    buffer = io.BytesIO()
    (image or Image.new("RGB", (64, 64), (90, 120, 30))).save(buffer, format=image_format)
    return buffer.getvalue()


def transparent_left_half(size: int = 64) -> Image.Image:
    """OpenAI's mask convention: fully transparent where the image is edited."""
    rgba = np.full((size, size, 4), 255, dtype=np.uint8)
    rgba[:, : size // 2, 3] = 0
    return Image.fromarray(rgba, "RGBA")


def decoded(item) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
    assert image.format == "PNG"
    return image.convert("RGB")


@pytest.mark.filterwarnings("ignore:You have passed 2 text prompts:FutureWarning")
def test_openai_client_edits_equal_diffusers(live_server, references):
    base_url, runtime = live_server
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="client-token", max_retries=0, timeout=120)
    image = source_image()
    # Image-to-image: no mask.
    result = client.images.edit(
        image=("source.png", png(image), "image/png"), prompt="a red cat", n=2,
        size="64x64", response_format="b64_json", extra_body={"seed": 5, "strength": 0.6},
    )
    expected = references(runtime, runtime.params("a red cat", n=2, seed=5, width=64, height=64,
                                                  edit=EditInput(image, 0.6)))
    got = [decoded(item) for item in result.data]
    assert len(got) == 2
    assert max(mean_abs_diff(a, b) for a, b in zip(got, expected, strict=True)) < 1.0
    # Inpainting with OpenAI's transparent mask: diffusers with the white-where-edited one.
    result = client.images.edit(
        image=("source.png", png(image), "image/png"), prompt="a boat",
        mask=("mask.png", png(transparent_left_half()), "image/png"),
        extra_body={"seed": 6, "strength": 0.75},
    )
    expected = references(runtime, runtime.params(
        "a boat", seed=6, width=64, height=64, edit=EditInput(image, 0.75, left_half_mask())))
    assert mean_abs_diff(decoded(result.data[0]), expected[0]) < 1.0


def form(**files):
    return {name: (f"{name}.png", data, "image/png") for name, data in files.items()}


GOOD = png(source_image())


def png_with_a_text_chunk_too_large_to_inflate() -> bytes:
    """1 kB on the wire; Pillow refuses the text chunk as it opens the file."""
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "a" * (PngImagePlugin.MAX_TEXT_CHUNK + 1), zip=True)
    buffer = io.BytesIO()
    source_image().save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "files", "param", "words"),
    [
        ({"prompt": "x"}, {"mask": GOOD}, "image", "required"),
        ({"prompt": "x", "image": "not a file"}, {"mask": GOOD}, "image", "file upload"),
        ({"prompt": "x"}, {"image": b"not an image at all"}, "image", "not a PNG"),
        # Other formats Pillow reads: never parsed at all.
        ({"prompt": "x"}, {"image": encoded("GIF")}, "image", "not a PNG"),
        ({"prompt": "x"}, {"image": encoded("TIFF")}, "image", "not a PNG"),
        ({"prompt": "x"}, {"image": GOOD[:200]}, "image", "cannot be decoded"),
        ({"prompt": "x"}, {"image": png_with_a_text_chunk_too_large_to_inflate()}, "image",
         "cannot be decoded"),
        ({"prompt": "x"}, {"image": png(source_image(128))}, "image", "pixels"),
        ({"prompt": "x"}, {"image": GOOD, "mask": png(left_half_mask(32))}, "mask", "same size"),
        ({}, {"image": GOOD}, "prompt", "prompt"),
        ({"prompt": "x", "strength": "0"}, {"image": GOOD}, "strength", "strength"),
        ({"prompt": "x", "strength": "1.5"}, {"image": GOOD}, "strength", "strength"),
        ({"prompt": "x", "strength": "abc"}, {"image": GOOD}, "strength", "strength"),
        ({"prompt": "x", "n": "99"}, {"image": GOOD}, "n", "n must be"),
        # Checked before the upload is decoded: the limit answers, not the broken picture.
        ({"prompt": "x", "n": "99"}, {"image": b"not an image at all"}, "n", "n must be"),
        ({"prompt": "x", "steps": "999"}, {"image": GOOD[:200]}, "steps", "steps must be"),
        ({"prompt": "x", "size": "100x100"}, {"image": GOOD}, "size", "multiple"),
        ({"prompt": "x", "stream": "true", "n": "2"}, {"image": GOOD}, "n", "one image"),
        ({"prompt": "x", "response_format": "url"}, {"image": GOOD}, "response_format", "inline"),
        ({"prompt": "x", "output_format": "webp"}, {"image": GOOD}, "output_format", "PNG"),
        ({"prompt": "x"}, {"image": GOOD, "markup": GOOD}, "markup", "only image and mask"),
        ({"prompt": "x", "strenght": "0.1"}, {"image": GOOD}, "strenght", "unknown parameter"),
        # JSON that nests past the parser's recursion limit: a 400, never an unhandled error.
        ({"prompt": "x", "lora": "[" * 200_000 + "]" * 200_000}, {"image": GOOD}, "lora",
         "JSON list"),
        ({"prompt": "x", "lora": "[" * 70 + "]" * 70}, {"image": GOOD}, "lora", "JSON list"),
    ],
)
def test_bad_uploads_are_400s_naming_the_field(client_for, data, files, param, words):
    client = client_for(max_upload_pixels=96 * 96)
    encoder_calls = count_calls(client.app.state.runtime.steps.pipeline.vae.encoder)
    response = client.post(EDITS, data=data, files=form(**files))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert words in error["message"], error
    assert encoder_calls() == 0 and client.app.state.runtime.engine.in_flight == 0


def test_openais_svg_object_is_ignored_as_its_client_writes_it(client_for):
    client = client_for()
    fields = {"prompt": "x", "steps": "2", "svg[model]": "m", "svg[reasoning][effort]": "low",
              "input_fidelity": "high", "user": "u1"}
    response = client.post(EDITS, data=fields, files=form(image=GOOD))
    assert response.status_code == 200, response.text


def test_two_images_and_other_bodies_are_refused(client_for):
    client = client_for()
    twice = [("image[]", ("a.png", GOOD, "image/png")), ("image[]", ("b.png", GOOD, "image/png"))]
    response = client.post(EDITS, data={"prompt": "x"}, files=twice)
    assert response.status_code == 400 and response.json()["error"]["param"] == "image"
    response = client.post(EDITS, json={"prompt": "x"})
    assert response.status_code == 415
    small = client_for(max_upload_bytes=4096)
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    response = small.post(EDITS, data={"prompt": "x"}, files=form(image=png(Image.fromarray(noise))))
    assert response.status_code == 413, response.text


def test_a_field_name_that_decodes_to_a_lone_surrogate_is_a_400_that_names_it(client_for):
    """Parts' names are decoded in the charset the request names: UTF-7's +2AA- is a lone
    surrogate, which the error that echoes the name must still be able to carry."""
    client = client_for()
    body = (b"--XX\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n"
            b"--XX\r\nContent-Disposition: form-data; name=\"foo[+2AA-]\"\r\n\r\ny\r\n"
            b"--XX--\r\n")
    response = client.post(EDITS, content=body, headers={
        "content-type": "multipart/form-data; boundary=XX; charset=utf-7"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "foo[\\ud800]" and "is not a field of this form" in error["message"]


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"lora[0][name]": ["ink", "film"]}, "lora.0.name", "more than once"),
    ({"lora[0][name]": "ink", "lora[2][name]": "film"}, "lora.1", "lora[1] is missing"),
    ({"lora[][name]": "ink", "lora[0][name]": "film"}, "lora", "not both"),
    ({"lora[1000][name]": "ink"}, "lora[1000][name]", "is not a field of this form"),
    ({"lora[][name]": ["ink", "film"], "lora[][scale]": "0.5"}, "lora.1.scale",
     "pair by count"),
], ids=["repeated", "gap", "mixed", "huge-index", "unpaired"])
def test_numbered_form_objects_are_refused_where_their_numbers_do_not_add_up(
        client_for, fields, param, words):
    client = client_for()
    response = client.post(EDITS, data={"prompt": "x", **fields}, files=form(image=GOOD))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_a_text_field_larger_than_a_json_body_may_be_is_refused(client_for):
    """A text field is parsed (lora as JSON text): it is bounded as a JSON body is, not by
    the upload's far larger limit."""
    client = client_for(max_body_bytes=4096)
    response = client.post(EDITS, data={"prompt": "x", "lora": "[" + "[]," * 2000 + "[]]"},
                           files=form(image=GOOD))
    assert response.status_code == 400, response.text
    assert "exceeded maximum size of 4KB" in response.json()["error"]["message"]


def test_a_family_without_edits_refuses_them(make_runtime):
    from fastapi.testclient import TestClient

    from imagegen_server.api import create_app

    runtime = make_runtime("sd3", warmup=False)
    with TestClient(create_app(runtime.settings, runtime)) as client:
        response = client.post(EDITS, data={"prompt": "x"}, files=form(image=GOOD))
        # Said before the upload is read as a picture: not even a broken one is decoded.
        broken = client.post(EDITS, data={"prompt": "x"}, files=form(image=b"not a picture"))
    for refused in (response, broken):
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "image"
        assert "not supported" in refused.json()["error"]["message"]


def edit(client, files, **data):
    response = client.post(EDITS, data={"prompt": "a boat", "seed": "3", **data}, files=files)
    assert response.status_code == 200, response.text
    return [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in response.json()["data"]]


def test_size_auto_edits_at_the_uploads_own_size_as_size_left_out(client_for):
    client = client_for()
    for data in ({"prompt": "x", "seed": "3"}, {"prompt": "x", "seed": "3", "size": "auto"}):
        response = client.post(EDITS, data={**data, "steps": "2"}, files=form(image=GOOD))
        assert response.status_code == 200, response.text
        assert Image.open(io.BytesIO(base64.b64decode(
            response.json()["data"][0]["b64_json"]))).size == Image.open(io.BytesIO(GOOD)).size


def test_a_large_upload_without_a_size_edits_at_the_largest_size_admitted(client_for):
    client = client_for()  # max_pixels 128x128
    (image,) = edit(client, form(image=png(source_image(256).resize((256, 192)))))
    assert image.size == (144, 104)  # 256x192 scaled to fit 16384 pixels, then to 8s


def test_a_large_upload_waits_at_the_size_it_edits_at_and_edits_the_same(client_for,
                                                                         monkeypatch):
    """A queued edit holds its picture and mask at the request's size, not the upload's (16
    megapixels would be 50 MB each), and no copy of the file it came in when nothing signs;
    the pixels are those of the full upload handed to the engine as it is."""
    client = client_for()
    runtime = client.app.state.runtime
    big, mask = source_image(256), left_half_mask(256)
    held, decoded, alive, submit = [], [], [], runtime.engine.submit

    decode_uploads = api.decode_uploads

    def decode(*args):
        pictures = decode_uploads(*args)
        decoded.extend(weakref.ref(p) for p in pictures[:2] if p is not None)
        return pictures

    def queued(params, *args):
        held.append(params.edit)
        # Nor does the route keep the full-size pictures it decoded while the edit waits.
        gc.collect()
        alive.extend(ref().size for ref in decoded if ref() is not None)
        return submit(params, *args)

    monkeypatch.setattr(api, "decode_uploads", decode)

    runtime.engine.submit = queued
    try:
        (image,) = edit(client, form(image=png(big), mask=png(mask)), size="64x64", steps="2")
    finally:
        runtime.engine.submit = submit
    assert (held[0].image.size, held[0].mask.size, held[0].parent) == ((64, 64), (64, 64), None)
    assert len(decoded) == 2 and alive == []
    whole = runtime.params("a boat", seed=3, steps=2, width=64, height=64,
                           edit=EditInput(big, 1.0, mask))
    (want,) = runtime.engine.generate(whole, timeout_s=120)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(want))


@pytest.mark.parametrize(("upload", "size"), [
    ((5, 5), (64, 64)),  # smaller than any size an edit can have: raised to the least
    ((60, 64), (64, 64)),
    ((2000, 100), (256, 64)),  # scaled to 16384 pixels it is 568x28: the short side at 64
    ((100, 2000), (64, 256)),
])
def test_a_small_or_narrow_upload_without_a_size_edits_at_a_size_that_can_run(
        client_for, upload, size):
    client = client_for()  # max_pixels 128x128
    (image,) = edit(client, form(image=png(source_image(64).resize(upload))))
    assert image.size == size


def test_an_upload_without_a_size_edits_at_the_listed_size_nearest_its_aspect(client_for):
    client = client_for(allowed_sizes=["96x64", "64x96", "128x64"])
    (image,) = edit(client, form(image=png(source_image(256).resize((256, 192)))))
    assert image.size == (96, 64)  # 4:3 is nearest 3:2 of 96x64, 64x64 and 128x64
    (image,) = edit(client, form(image=png(source_image(256).resize((100, 200)))))
    assert image.size == (64, 96)


def test_an_exif_rotated_photo_is_edited_as_shown(client_for):
    stored = source_image(128).resize((128, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif)
    client = client_for()
    (image,) = edit(client, {"image": ("photo.jpg", buffer.getvalue(), "image/jpeg")})
    assert image.size == (64, 128)


def test_an_opaque_rgba_mask_is_read_by_brightness(client_for):
    client = client_for()
    opaque = left_half_mask().convert("RGBA")
    (a,) = edit(client, form(image=GOOD, mask=png(opaque)))
    (b,) = edit(client, form(image=GOOD, mask=png(left_half_mask())))
    (c,) = edit(client, form(image=GOOD))
    assert mean_abs_diff(a.convert("RGB"), b.convert("RGB")) == 0.0
    assert mean_abs_diff(a.convert("RGB"), c.convert("RGB")) > 0.0


def test_a_phone_jpeg_with_a_multi_picture_index_is_edited(client_for):
    """Pillow names such a JPEG MPO; its first frame is the photo."""
    buffer = io.BytesIO()
    source_image().save(buffer, format="MPO", save_all=True, append_images=[source_image(32)])
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"
    (image,) = edit(client_for(), {"image": ("photo.jpg", buffer.getvalue(), "image/jpeg")})
    assert image.size == (64, 64)
