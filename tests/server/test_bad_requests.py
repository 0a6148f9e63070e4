"""Bad requests, one table: each answers OpenAI's error shape with the right status and
``param``, before any device work, and the server keeps serving after all of them."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from server_testlib import tiny_settings

from imagegen_server.api import create_app
from imagegen_server.runtime import ModelRuntime

GENERATE = "/v1/images/generations"
TOKEN = "table-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"content-type": "application/json"}
BODY_LIMIT = 4096


def case(body, status, param, **kw):
    """A JSON body posted to the generation route with the right token."""
    return {"json": body, "status": status, "param": param, **kw}


def raw(content: bytes, status, param=None, headers=None, **kw):
    return {"content": content, "headers": {**AUTH, **JSON, **(headers or {})}, "status": status,
            "param": param, **kw}


CASES = {
    # size: grammar, multiples, limits
    "size-one-number": case({"prompt": "x", "size": "64"}, 400, "size"),
    "size-not-multiple-of-8": case({"prompt": "x", "size": "65x64"}, 400, "size"),
    "size-too-small": case({"prompt": "x", "size": "8x8"}, 400, "size"),
    "size-too-many-pixels": case({"prompt": "x", "size": "9000x64"}, 400, "size"),
    "size-zeros": case({"prompt": "x", "size": "00x00"}, 400, "size"),
    "size-zero-width": case({"prompt": "x", "size": "0x64"}, 400, "size"),
    "size-dalle3": case({"prompt": "x", "size": "1024x1792"}, 400, "size", says="pixels"),
    "size-three-parts": case({"prompt": "x", "size": "64x64x64"}, 400, "size"),
    "size-number": case({"prompt": "x", "size": 64}, 400, "size"),
    "size-negative": case({"prompt": "x", "size": "-64x64"}, 400, "size"),
    "size-space": case({"prompt": "x", "size": " 64x64"}, 400, "size"),
    "size-newline": case({"prompt": "x", "size": "64x64\n"}, 400, "size"),
    "size-capital-x": case({"prompt": "x", "size": "64X64"}, 400, "size"),
    "size-huge-digits": case({"prompt": "x", "size": "999999999x64"}, 400, "size"),
    # n: one limit, one message
    "n-zero": case({"prompt": "x", "n": 0}, 400, "n", says="between 1 and 4"),
    "n-five": case({"prompt": "x", "n": 5}, 400, "n", says="between 1 and 4"),
    "n-sixty-five": case({"prompt": "x", "n": 65}, 400, "n", says="between 1 and 4"),
    "n-negative": case({"prompt": "x", "n": -1}, 400, "n"),
    "n-word": case({"prompt": "x", "n": "two"}, 400, "n"),
    "n-float": case({"prompt": "x", "n": 1.5}, 400, "n"),
    "n-numeric-string": case({"prompt": "x", "n": "2"}, 400, "n"),
    "n-bool": case({"prompt": "x", "n": True}, 400, "n"),
    # lora: a list of objects
    "lora-item-a-string": case({"prompt": "x", "lora": ["ink"]}, 400, "lora.0",
                               says="lora.0: must be an object such as"),
    "lora-not-a-list": case({"prompt": "x", "lora": {"name": "ink"}}, 400, "lora"),
    "lora-name-huge": case({"prompt": "x", "lora": [{"name": "a" * 3000}]}, 400,
                           "lora.0.name", says="at most 63"),
    "lora-unknown-key": case({"prompt": "x", "lora": [{"name": "ink", "weight": 0.5}]}, 400,
                             "lora.0.weight", code="unknown_parameter"),
    # Fields of other APIs, or misspelt: refused, as OpenAI refuses them, never a default image
    "unknown-diffusers-steps": case({"prompt": "x", "num_inference_steps": 1}, 400,
                                    "num_inference_steps", code="unknown_parameter"),
    "unknown-width": case({"prompt": "x", "width": 128}, 400, "width",
                          code="unknown_parameter"),
    "unknown-misspelt-seed": case({"prompt": "x", "sed": 5}, 400, "sed",
                                  code="unknown_parameter"),
    # steps
    "steps-zero": case({"prompt": "x", "steps": 0}, 400, "steps"),
    "steps-too-many": case({"prompt": "x", "steps": 201}, 400, "steps"),
    "steps-string": case({"prompt": "x", "steps": "3"}, 400, "steps"),
    "steps-float": case({"prompt": "x", "steps": 2.5}, 400, "steps"),
    # prompt and negative prompt
    "prompt-too-long": case({"prompt": "x" * 2001}, 400, "prompt"),
    "prompt-empty": case({"prompt": ""}, 400, "prompt"),
    "prompt-number": case({"prompt": 123}, 400, "prompt"),
    "prompt-missing": case({"n": 1}, 400, "prompt", code="missing_required_parameter"),
    "prompt-null": case({"prompt": None}, 400, "prompt"),
    "prompt-list": case({"prompt": ["a"]}, 400, "prompt"),
    "negative-list": case({"prompt": "x", "negative_prompt": ["a"]}, 400, "negative_prompt"),
    # Lone surrogates (JSON allows the escape) would fail the tokenizer, and with it every
    # request batched with this one: refused here, naming the field.
    "prompt-lone-surrogate": raw(b'{"prompt": "\\ud800"}', 400, "prompt"),
    "negative-lone-surrogate": raw(b'{"prompt": "x", "negative_prompt": "a\\udfff"}', 400,
                                   "negative_prompt", says="surrogate"),
    "lora-name-lone-surrogate": raw(b'{"prompt": "x", "lora": [{"name": "\\ud800"}]}', 400,
                                    "lora.0.name", says="surrogate"),
    "negative-too-long": case({"prompt": "x", "negative_prompt": "y" * 2001}, 400,
                              "negative_prompt"),
    # guidance_scale: strict and finite
    "guidance-word": case({"prompt": "x", "guidance_scale": "high"}, 400, "guidance_scale"),
    "guidance-numeric-string": case({"prompt": "x", "guidance_scale": "7"}, 400,
                                    "guidance_scale"),
    "guidance-negative": case({"prompt": "x", "guidance_scale": -1}, 400, "guidance_scale"),
    "guidance-too-big": case({"prompt": "x", "guidance_scale": 101}, 400, "guidance_scale"),
    "guidance-nan": raw(b'{"prompt": "x", "guidance_scale": NaN}', 400, "guidance_scale",
                        says="finite"),
    "guidance-infinity": raw(b'{"prompt": "x", "guidance_scale": Infinity}', 400,
                             "guidance_scale"),
    "guidance-bool": case({"prompt": "x", "guidance_scale": True}, 400, "guidance_scale"),
    # seed
    "seed-negative": case({"prompt": "x", "seed": -1}, 400, "seed"),
    "seed-too-big": case({"prompt": "x", "seed": 2**63}, 400, "seed"),
    "seed-string": case({"prompt": "x", "seed": "1"}, 400, "seed"),
    # response_format, model
    "format-url": case({"prompt": "x", "response_format": "url"}, 400, "response_format",
                       says="inline"),
    "format-number": case({"prompt": "x", "response_format": 1}, 400, "response_format"),
    "model-unknown": case({"prompt": "x", "model": "dall-e-3"}, 404, "model"),
    "model-number": case({"prompt": "x", "model": 3}, 400, "model"),
    "model-huge": case({"prompt": "x", "model": "m" * 3000}, 400, "model"),
    # streaming
    "stream-string": case({"prompt": "x", "stream": "yes"}, 400, "stream"),
    "stream-many": case({"prompt": "x", "stream": True, "n": 2}, 400, "n", says="one image"),
    "partial-images-4": case({"prompt": "x", "stream": True, "partial_images": 4}, 400,
                             "partial_images"),
    # Out of range is refused unstreamed too, where the field is otherwise ignored.
    "partial-images-unstreamed": case({"prompt": "x", "partial_images": 9}, 400,
                                      "partial_images"),
    "partial-images-negative": case({"prompt": "x", "partial_images": -1}, 400,
                                    "partial_images"),
    "partial-images-string": case({"prompt": "x", "stream": True, "partial_images": "2"}, 400,
                                  "partial_images"),
    # formats: PNG, opaque
    "format-jpeg": case({"prompt": "x", "output_format": "jpeg"}, 400, "output_format",
                        says="PNG"),
    "background-transparent": case({"prompt": "x", "background": "transparent"}, 400,
                                   "background"),
    "background-unknown": case({"prompt": "x", "background": "weird"}, 400, "background"),
    "compression-above-100": case({"prompt": "x", "output_compression": 101}, 400,
                                  "output_compression"),
    # the body as a whole
    "body-list": case(["not", "an", "object"], 400, None, says="JSON object"),
    "body-string": case("prompt", 400, None),
    "body-null": raw(b"null", 400),
    "body-number": case(3, 400, None),
    "json-invalid": raw(b"{not json", 400, code="invalid_json"),
    "json-trailing-garbage": raw(b'{"prompt": "x"} x', 400, code="invalid_json"),
    "json-empty": raw(b"", 400, code="invalid_json"),
    "json-bad-utf8": raw(b'{"prompt": "\xff\xfe"}', 400, says="UTF-8"),
    "json-too-deep": raw(b"[" * 100_000 + b"]" * 100_000, 413),
    "json-deep-within-limit": raw(b"[" * 1500 + b"]" * 1500, 400, says="nested too deeply"),
    # Deeper than any body nests, yet far within the parser's recursion limit.
    "json-deeper-than-any-body": raw(b'{"prompt": "x", "lora": ' + b"[" * 70 + b"]" * 70 + b"}",
                                     400, says="nested too deeply"),
    # content type and size
    "form-encoded": raw(b"prompt=x", 415, headers={"content-type":
                                                   "application/x-www-form-urlencoded"}),
    "text-plain": raw(b'{"prompt": "x"}', 415, headers={"content-type": "text/plain"}),
    "no-content-type": {"content": b'{"prompt": "x"}', "headers": AUTH, "status": 415,
                        "param": None},
    "body-over-limit": raw(json.dumps({"prompt": "x" * BODY_LIMIT}).encode(), 413),
    "body-over-limit-chunked": {"chunked": True, "status": 413, "param": None},
    # routing
    "get-generations": {"method": "GET", "path": GENERATE, "status": 405, "param": None},
    "put-generations": {"method": "PUT", "path": GENERATE, "status": 405, "param": None},
    "no-such-route": {"method": "POST", "path": "/v1/images/variations", "status": 404,
                      "param": None},
    "get-edits": {"method": "GET", "path": "/v1/images/edits", "status": 405, "param": None},
    "edits-as-json": {"method": "POST", "path": "/v1/images/edits", "json": {"prompt": "x"},
                      "status": 415, "param": None},
    "no-such-page": {"method": "GET", "path": "/nope", "status": 404, "param": None},
    "delete-models": {"method": "DELETE", "path": "/v1/models", "status": 405, "param": None},
    # auth: checked before anything about the body
    "no-token": {"json": {"prompt": "x"}, "headers": {}, "status": 401,
                 "param": "authorization"},
    "wrong-token": {"json": {"prompt": "x"}, "headers": {"Authorization": "Bearer no"},
                    "status": 401, "param": "authorization"},
    "basic-scheme": {"json": {"prompt": "x"}, "headers": {"Authorization": f"Basic {TOKEN}"},
                     "status": 401, "param": "authorization"},
    "no-token-invalid-json": {"content": b"{not json", "headers": JSON, "status": 401,
                              "param": "authorization"},
    "no-token-huge-body": {"content": b"x" * (BODY_LIMIT * 4), "headers": JSON, "status": 401,
                           "param": "authorization"},
    "no-token-models": {"method": "GET", "path": "/v1/models", "headers": {}, "status": 401,
                        "param": "authorization"},
    "no-token-openapi": {"method": "GET", "path": "/openapi.json", "headers": {},
                         "status": 401, "param": "authorization"},
    "docs-page": {"method": "GET", "path": "/docs", "status": 404, "param": None},
}


@pytest.fixture(scope="module")
def client(tiny_models, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(TOKEN + "\n")
    settings = tiny_settings(tiny_models["sd15"], warmup=False, max_body_bytes=BODY_LIMIT,
                             auth_token_file=str(token_file))
    runtime = ModelRuntime(settings).load()
    with TestClient(create_app(settings, runtime)) as test_client:
        yield test_client
    runtime.close(timeout=30)


def send(client: TestClient, spec: dict):
    method = spec.get("method", "POST")
    path = spec.get("path", GENERATE)
    headers = spec.get("headers", AUTH)
    if spec.get("chunked"):
        def chunks():
            for _ in range(8):
                yield b'{"prompt": "' + b"x" * BODY_LIMIT

        return client.post(path, content=chunks(), headers={**AUTH, **JSON})
    if "content" in spec:
        return client.request(method, path, content=spec["content"], headers=headers)
    if "json" in spec:
        return client.request(method, path, json=spec["json"], headers=headers)
    return client.request(method, path, headers=headers)


def test_the_table_is_large_enough():
    assert len(CASES) >= 60


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request(client, name):
    spec = CASES[name]
    response = send(client, spec)
    assert response.status_code == spec["status"], response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["param"] == spec["param"], error
    assert error["message"] and isinstance(error["message"], str)
    assert error["type"] == ("authentication_error" if spec["status"] == 401
                             else "invalid_request_error")
    if spec["param"] not in (None, "authorization"):
        assert spec["param"] in error["message"], error  # the message names the field too
    if "says" in spec:
        assert spec["says"] in error["message"], error
    if "code" in spec:
        assert error["code"] == spec["code"], error
    if spec["status"] == 401:
        assert response.headers["WWW-Authenticate"] == "Bearer"
    # Nothing reached the engine, and the server still serves.
    assert client.app.state.runtime.engine.in_flight == 0


def test_still_serving_after_the_table(client):
    for spec in CASES.values():
        send(client, spec)
    ok = client.post(GENERATE, json={"prompt": "after all that", "steps": 1}, headers=AUTH)
    assert ok.status_code == 200, ok.text
    assert len(ok.json()["data"]) == 1


OPENAI_CLASSES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError"}
# Every JSON case sent with the default token, the way the openai client sends bodies.
OPENAI_CASES = [name for name, spec in CASES.items()
                if "json" in spec and "headers" not in spec and "method" not in spec]


@pytest.mark.parametrize("name", OPENAI_CASES)
def test_the_openai_client_raises_its_class_for_the_case(client, name):
    import openai

    spec = CASES[name]
    sdk = openai.OpenAI(api_key=TOKEN, base_url="http://testserver/v1", http_client=client,
                        max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        sdk.post("/images/generations", cast_to=object, body=spec["json"])
    assert type(info.value).__name__ == OPENAI_CLASSES[spec["status"]], info.value
    assert info.value.status_code == spec["status"]
    assert info.value.body["param"] == spec["param"]


def test_a_huge_value_is_not_echoed_back(client):
    for body in ({"prompt": "x", "lora": [{"name": "a" * 3000}]},  # the body's limit is 4096
                 {"prompt": "x", "model": "m" * 3000},
                 {"prompt": "x", "size": "5" * 3000},
                 {"prompt": "x", "response_format": "u" * 3000},
                 {"prompt": "x", "output_format": "j" * 3000},
                 {"prompt": "x", "n" * 3000: 1}):
        response = client.post(GENERATE, json=body, headers=AUTH)
        assert response.status_code == 400 and len(response.content) < 1000, response.text


def test_openais_own_fields_without_use_here_are_accepted(client):
    extras = {"quality": "hd", "style": "vivid", "user": "u1", "moderation": "low",
              "safety_identifier": "s", "complexity": "low"}
    response = client.post(GENERATE, json={"prompt": "x", "steps": 1, **extras}, headers=AUTH)
    assert response.status_code == 200, response.text


def test_a_path_with_a_trailing_slash_is_a_404_in_openais_shape(client):
    response = client.post(GENERATE + "/", json={"prompt": "x"}, headers=AUTH,
                           follow_redirects=False)
    assert response.status_code == 404 and response.json()["error"]["type"]


def test_most_json_cases_go_through_the_openai_client_too():
    assert len(OPENAI_CASES) >= 45
