"""Request bodies of the image routes: reading them, validating them, and the errors.

Errors follow OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with
``param`` naming the offending field.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from typing import Annotated, Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from .previews import MAX_PARTIAL_IMAGES
from .uploads import MEDIA_TYPES, edit_image, edit_mask, open_image

SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")  # whole text: fullmatch
# The fields of images.generate and images.edit in OpenAI's Python client that this server
# has no use for (the README's table says why each); every other unknown field is a 400.
OPENAI_IGNORED = frozenset({
    "quality", "complexity", "style", "moderation", "input_fidelity", "frame_count",
    "frame_duration_ms", "svg", "user", "safety_identifier",
})
# The longest LoRA name a service declares (a DNS label, as spec.model.loras names it).
LORA_NAME_MAX = 63
# A number, strictly: "7" is not one, nor NaN or infinity; 7 is 7.0.
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
# Deeper than any body of these routes nests. The parser's own bound is the interpreter's
# recursion limit, which torch's compiler raises for the whole process (to 2000), so the
# answer to a deep body would depend on whether something had been compiled.
MAX_JSON_DEPTH = 64


def _unicode_text(value: str | None) -> str | None:
    """Text a tokenizer and a PNG text chunk can hold: JSON's ``\\ud800`` escapes (and a form
    in a charset that makes them) give lone surrogates, which fail the whole batch they
    reach, far from the request that brought them."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must be Unicode text; it holds a lone surrogate "
                             "(an unpaired \\ud800-\\udfff escape)") from None
    return value


class LoraChoice(BaseModel):
    """One LoRA adapter a request asks for: a name the service declared, and its scale
    (the declared scale when left out)."""

    model_config = ConfigDict(extra="forbid")

    name: StrictStr
    scale: Number | None = None

    _text = field_validator("name")(_unicode_text)

    @field_validator("name")
    @classmethod
    def _declarable(cls, value: str) -> str:
        # Checked after _unicode_text, so a lone surrogate is named as such.
        if len(value) > LORA_NAME_MAX:
            raise ValueError(f"must be at most {LORA_NAME_MAX} characters, as the names a "
                             "service declares")
        return value


class ImageRequest(BaseModel):
    """What generations and edits share: OpenAI's fields plus seed, steps, guidance_scale,
    negative_prompt and lora; the size grammar; inline PNG answers.

    Only types and the size grammar are checked here; every limit (how many images, pixels,
    steps) is the engine's ``check_request``, so each has one message. A JSON body is read
    strictly (``"2"`` is no number); a form's values are text and are read as such.
    """

    # Anything else is refused, as OpenAI refuses it: a misspelt or foreign field
    # (num_inference_steps, cfg_scale) would otherwise give a default image with a 200.
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    model: str | None = Field(default=None, max_length=256)
    # null means "the default" for the optional OpenAI fields, as OpenAI itself treats them.
    n: int | None = 1
    size: str | None = None
    response_format: str | None = "b64_json"
    output_format: str | None = None
    background: Literal["auto", "opaque", "transparent"] | None = None
    # Changes nothing for PNG; read only to refuse what OpenAI refuses. (The other fields
    # this server ignores, OPENAI_IGNORED, gain values as OpenAI's models do: they are left
    # unread, so a newer client is not refused.)
    output_compression: int | None = Field(default=None, ge=0, le=100)
    stream: bool | None = None
    # Refused out of range even unstreamed (where it is ignored), as OpenAI refuses it.
    partial_images: int | None = Field(default=None, ge=0, le=MAX_PARTIAL_IMAGES)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    steps: int | None = None
    guidance_scale: float | None = Field(default=None, allow_inf_nan=False)
    negative_prompt: str | None = None
    lora: list[LoraChoice] | None = Field(default=None, max_length=16)

    _text = field_validator("prompt", "negative_prompt", "model")(_unicode_text)

    @model_validator(mode="before")
    @classmethod
    def _without_openai_extras(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {key: item for key, item in value.items() if key not in OPENAI_IGNORED}
        return value

    @field_validator("size", check_fields=False)
    @classmethod
    def _size_grammar(cls, value: str | None) -> str | None:
        if value == "auto":
            # OpenAI's default: the server's choice, as when size is left out (the default
            # size for a generation, the upload's own for an edit).
            return None
        if value is None or SIZE.fullmatch(value):
            return value
        raise ValueError(
            f"size {shown(value)} is not WIDTHxHEIGHT in pixels, such as '512x512', or 'auto'")

    @field_validator("response_format", check_fields=False)
    @classmethod
    def _inline_only(cls, value: str | None) -> str | None:
        if value not in (None, "b64_json"):
            raise ValueError(
                f"response_format {shown(str(value))} is not supported: this server returns images "
                "inline, as 'b64_json', and hosts no URLs"
            )
        return value

    @field_validator("output_format", check_fields=False)
    @classmethod
    def _png_only(cls, value: str | None) -> str | None:
        if value not in (None, "png"):
            raise ValueError(
                f"output_format {shown(str(value))} is not supported: this server returns PNG")
        return value

    @field_validator("background", check_fields=False)
    @classmethod
    def _opaque_only(cls, value: str | None) -> str | None:
        if value == "transparent":
            raise ValueError("background 'transparent' is not supported: the images are opaque")
        return value



class ImageGenerationRequest(ImageRequest):
    """OpenAI's ``images.generate`` body, with the extensions; validated strictly."""


class ImageEditForm(ImageRequest):
    """The text fields of OpenAI's ``images.edit`` form, with the extensions and strength."""

    # diffusers' defaults: 0.8 for image-to-image, 1.0 (repaint fully) under a mask.
    strength: float | None = Field(default=None, allow_inf_nan=False)

    # A form field holds text: the same list as on generations, as JSON.
    @field_validator("lora", mode="before")
    @classmethod
    def _lora_json(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            parsed = None
        else:
            if not _deeper_than(parsed, MAX_JSON_DEPTH):
                return parsed
        raise ValueError('lora must be a JSON list such as [{"name": "ink", "scale": 0.8}]')


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        kind: str = "",
        code: str | None = None,
        headers=None,
    ):
        super().__init__(message)
        self.status = status
        self.param = param
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self.code = code
        self.headers = headers or {}


def error_response(
    status: int, message: str, param: str | None, kind: str, headers=None, code: str | None = None
):
    body = {"error": {"message": _encodable(message), "type": kind,
                      "param": None if param is None else _encodable(param), "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _encodable(text: str) -> str:
    """``text`` as UTF-8 can carry it: a lone surrogate (a form field named in a charset that
    makes one, echoed in the message) written as its escape, not a 500 from the encoder."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# pydantic's error types -> OpenAI-style codes.
VALIDATION_CODES = {"missing": "missing_required_parameter", "value_error": "invalid_value",
                    "extra_forbidden": "unknown_parameter"}
# The most of a client's text an error message repeats.
ECHOED_CHARS = 64


def shown(text: str) -> str:
    """A client's text as an error message quotes it: cut short, so a huge value gives a
    short answer."""
    return repr(text if len(text) <= ECHOED_CHARS else text[:ECHOED_CHARS] + "...")


def validation_error(exc: ValidationError) -> ApiError:
    """The first problem of a body, as OpenAI reports it: 400, the field, a sentence."""
    first = exc.errors(include_url=False)[0]
    loc = [str(part) for part in first.get("loc", ())]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    message = first.get("msg", "invalid value")
    if kind == "value_error":
        message = str(first.get("ctx", {}).get("error", message))
        if param and param not in message:
            message = f"{param}: {message}"
    elif kind == "extra_forbidden":
        message = f"unknown parameter {shown(param)}: not a field of this API"
        param = param[:ECHOED_CHARS]
    elif kind == "model_type" and param:
        message = f"{param}: must be an object"
        if loc[0] == "lora":
            message += ' such as {"name": "ink", "scale": 0.8}'
    elif kind == "model_type":
        message = "the request body must be a JSON object"
    elif param:
        message = f"{param}: {message}"
    code = VALIDATION_CODES.get(kind, "invalid_type" if kind.endswith("_type") else "invalid_value")
    return ApiError(400, message, param=param, code=code)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or a 413 once it is known to be larger than ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is larger than {limit} bytes", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:  # a body without a length, or one that lied about it
            raise ApiError(413, f"request body is larger than {limit} bytes", code="body_too_large")
    return bytes(body)


def _require_media_type(request: Request, expected: str) -> None:
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != expected:
        raise ApiError(
            415,
            f"Content-Type must be {expected}, not {content_type or 'missing'!r}",
            code="unsupported_media_type",
        )


async def read_json_body(request: Request, limit: int) -> Any:
    """The body as JSON, or the error a client should see: 415, 413 or 400."""
    _require_media_type(request, "application/json")
    body = await read_body(request, limit)
    # In a thread: the depth walk, Python code, takes a while for a large body, and the event
    # loop (the probes) gets its turns meanwhile. (json.loads itself, C code holding the GIL,
    # is the lesser part: 0.06 s of 0.3 s for a 1 MiB body of empty lists.)
    return await asyncio.to_thread(json_value, body)


def json_value(body: bytes) -> Any:
    """``body`` as JSON, or the 400 that says why not."""
    too_deep = ApiError(400, "request body is nested too deeply", code="invalid_json")
    try:
        value = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ApiError(400, "request body is not valid UTF-8", code="invalid_json") from exc
    except RecursionError as exc:
        raise too_deep from exc
    except ValueError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    if _deeper_than(value, MAX_JSON_DEPTH):
        raise too_deep
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than ``limit`` levels (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


# A form has a few text fields and at most these files (image and mask).
FORM_FILES = ("image", "mask")
# A list of objects as form fields: OpenAI's client writes extra_body={"lora": [{...}]} as
# lora[][name], lora[][scale] (its "brackets" array format); lora[0][name] is the indexed form.
NESTED_FIELD = re.compile(r"^(?P<field>\w+)\[(?P<index>\d{0,3})\]\[(?P<key>\w+)\]$")
FORM_LISTS = ("lora",)


class _FormList:
    """One list of objects, gathered from its bracketed fields: ``lora[][name]`` appended,
    or ``lora[0][name]`` by index, counting from 0 (so that an error's ``param``,
    ``lora.2.name``, names the object the client numbered 2).

    Appended fields pair by count, not by the order they came in: OpenAI's client sends
    every ``lora[][name]`` first, then every ``lora[][scale]``. The k-th scale is the
    k-th object's, so a key is given for every object or for none."""

    def __init__(self, field: str) -> None:
        self.field = field
        self.appended: dict[str, list[Any]] = {}
        self.indexed: dict[int, dict[str, Any]] = {}

    def add(self, index: str, key: str, value: str) -> None:
        value = _form_number(value) if key == "scale" else value
        if not index:
            self.appended.setdefault(key, []).append(value)
            return
        item = self.indexed.setdefault(int(index), {})
        if key in item:
            raise ApiError(400, f"{self.field}[{index}][{key}] is given more than once: "
                           "send one", param=f"{self.field}.{int(index)}.{key}",
                           code="invalid_value")
        item[key] = value

    def items(self) -> list[dict[str, Any]]:
        if self.appended and self.indexed:
            raise ApiError(400, f"{self.field}: number its objects ({self.field}[0][name]) or "
                           f"append them ({self.field}[][name]), not both", param=self.field,
                           code="invalid_value")
        missing = sorted(set(range(len(self.indexed))) - set(self.indexed))
        if missing:
            raise ApiError(400, f"{self.field}[{missing[0]}] is missing: numbered objects count "
                           "up from 0", param=f"{self.field}.{missing[0]}", code="invalid_value")
        return self._appended() + [self.indexed[i] for i in sorted(self.indexed)]

    def _appended(self) -> list[dict[str, Any]]:
        count = max((len(values) for values in self.appended.values()), default=0)
        for key, values in self.appended.items():
            if len(values) != count:
                raise ApiError(
                    400, f"{self.field}[][{key}] is given {len(values)} times for {count} "
                    f"objects: appended objects pair by count, so give {key} on every one, "
                    f"or number them ({self.field}[0][{key}]), or send {self.field} as JSON "
                    "text", param=f"{self.field}.{len(values)}.{key}", code="invalid_value")
        return [{key: values[k] for key, values in self.appended.items()} for k in range(count)]


def _form_number(value: str) -> Any:
    try:
        return float(value)
    except ValueError:
        return value  # refused by the model, naming the field


async def read_form(request: Request, limit: int,
                    field_limit: int) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A multipart form's text fields and files, within ``limit`` bytes in all and
    ``field_limit`` a text field: 415, 413, 400.

    A file field sent twice (OpenAI's client sends a list of images as ``image[]``) is a 400:
    an edit starts from one image. ``lora`` comes as JSON text or as bracketed fields
    (``lora[][name]``, as OpenAI's client writes a list in ``extra_body``); any other
    bracketed field is a 400, never silently dropped.
    """
    _require_media_type(request, "multipart/form-data")
    body = await read_body(request, limit)

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(
            max_files=len(FORM_FILES), max_fields=64, max_part_size=field_limit
        )
    except (StarletteHTTPException, MultiPartException) as exc:
        detail = getattr(exc, "detail", None) or getattr(exc, "message", str(exc))
        raise ApiError(400, f"request body is not a valid multipart form: {detail}",
                       code="invalid_form") from exc
    try:
        fields: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        lists: dict[str, _FormList] = {}
        for key, value in form.multi_items():
            if key.split("[", 1)[0] in OPENAI_IGNORED:
                continue  # svg[model], as OpenAI's client writes an object: ignored as on JSON
            nested = NESTED_FIELD.match(key)
            if nested and nested["field"] in FORM_LISTS and isinstance(value, str):
                lists.setdefault(nested["field"], _FormList(nested["field"])).add(
                    nested["index"], nested["key"], value)
                continue
            name = key.removesuffix("[]")
            if "[" in name or "]" in name:
                raise ApiError(400, f"{shown(key)} is not a field of this form; of its fields "
                               f"only {', '.join(FORM_LISTS)} is a list of objects",
                               param=key[:ECHOED_CHARS], code="invalid_value")
            if name in fields or name in files or name in lists:
                raise ApiError(400, f"{shown(name)} is given more than once: send one",
                               param=name[:ECHOED_CHARS], code="invalid_value")
            if isinstance(value, str):
                if name in FORM_FILES:
                    raise ApiError(400, f"{name} must be a file upload, not a text field",
                                   param=name, code="invalid_type")
                fields[name] = value
            elif name in FORM_FILES:
                files[name] = await value.read()
            else:
                raise ApiError(400, f"{shown(name)} is a file; only "
                               f"{' and '.join(FORM_FILES)} are", param=name[:ECHOED_CHARS],
                               code="invalid_type")
        for name, gathered in lists.items():
            if name in fields:
                raise ApiError(400, f"{name} is given more than once: send one", param=name,
                               code="invalid_value")
            fields[name] = gathered.items()
        return fields, files
    finally:
        await form.close()


def streamed_previews(body: ImageRequest) -> int:
    """How many previews a request streams; a streamed request makes one image."""
    if not body.stream:
        return 0  # partial_images without stream: ignored, as OpenAI ignores it
    if body.n not in (None, 1):
        raise ApiError(400, f"a streamed request makes one image: n must be 1, not {body.n}",
                       param="n", code="invalid_value")
    return body.partial_images or 0


def parse(model: type[BaseModel], raw: Any, *, strict: bool = False):
    """A body validated by ``model``, or the 400 naming its first bad field."""
    try:
        return model.model_validate(raw, strict=strict)
    except ValidationError as exc:
        raise validation_error(exc) from exc


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None:
        return None, None
    width, height = (int(v) for v in size.split("x"))
    return width, height


def decode_uploads(files: dict[str, bytes], max_pixels: int):
    """The edit's RGB image, grayscale mask (None without one) and the image file's media
    type, checked and decoded."""
    image = open_image(files["image"], "image", max_pixels)
    # Read from the header again: the image turned upright by its EXIF is a copy without it.
    with Image.open(io.BytesIO(files["image"])) as header:
        media_type = MEDIA_TYPES[header.format]
    mask = None
    if "mask" in files:
        mask = edit_mask(open_image(files["mask"], "mask", max_pixels), image)
    return edit_image(image), mask, media_type
