"""What a generated PNG says about itself: how it was made, and that a model made it.

Each PNG carries, unless the server is told not to (``provenance=false``):

- a ``parameters`` text chunk: the generation parameters as JSON (prompt, negative prompt,
  seed, steps, guidance, size, model, and for an edit its strength and whether it was masked);
- an XMP packet (the ``XML:com.adobe.xmp`` iTXt chunk) with IPTC's digital source type
  ``trainedAlgorithmicMedia`` (an edit: ``compositeWithTrainedAlgorithmicMedia``), the
  machine-readable "made by a generative model" mark that IPTC defines and C2PA and the
  major platforms read (https://cv.iptc.org/newscodes/digitalsourcetype/);
- ``Software``: this server and its version.

Metadata is not a watermark: anyone can strip or rewrite it. With a signing certificate
(``c2pa_cert_file`` and ``c2pa_key_file``), each PNG also carries a C2PA manifest signed with
``c2pa-python``: a ``c2pa.created`` action whose digital source type is
``trainedAlgorithmicMedia``, naming this server as the software agent; an edit is instead
``c2pa.opened`` (the upload, as the parent ingredient) and ``c2pa.edited``
(``compositeWithTrainedAlgorithmicMedia``). A reader (any C2PA
tool) then sees who signed it, and a changed pixel breaks the hash the signature covers.

The parent is the uploaded file as sent, hashed, with no thumbnail: its hash matches the
user's file, and the edit does not carry a copy of the picture it changed (a face or a
number plate inpainted away stays away). An upload that carries a C2PA manifest of its own
(a camera's, another generator's) would bring that manifest along, with its thumbnail of
the picture: there, and for a file c2pa cannot read, the parent is the decoded picture as
a PNG instead (at the size the edit ran at: a larger upload is resized as the request is
accepted), and the chain to the upload's own manifest is not kept. So is an upload that
names its manifest by address: c2pa is told never to fetch one.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import __version__
from .config import DenoiserCache, Quantization, ServerSettings
from .request import GenerationParams

log = logging.getLogger(__name__)

TRAINED_ALGORITHMIC_MEDIA = (
    "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
)
# An edit: a model's work composited with the uploaded picture (inpainting, image-to-image).
COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA = (
    "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
)


def source_type(edited: bool) -> str:
    """IPTC's digital source type for an image this server made."""
    return COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA if edited else TRAINED_ALGORITHMIC_MEDIA
SOFTWARE = f"imagegen-server {__version__}"

_XMP = """<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    Iptc4xmpExt:DigitalSourceType={source}
    xmp:CreatorTool={tool}/>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="r"?>"""


def levers(settings: ServerSettings) -> dict:
    """What of the server's settings changes its images beside the request: the denoiser's
    quantization and its cache, with the knob that cache reads. Empty with neither."""
    made = {}
    if settings.quantization != Quantization.NONE:
        made["quantization"] = settings.quantization.value
    if settings.cache != DenoiserCache.NONE:
        knob = ("threshold" if settings.cache in (DenoiserCache.FIRST_BLOCK_CACHE,
                                                  DenoiserCache.MAG_CACHE) else "interval")
        made["cache"] = {"method": settings.cache.value,
                         knob: getattr(settings, f"cache_{knob}")}
    return made


def parameters(params: GenerationParams, made_with: dict, index: int) -> dict:
    """The record of how image ``index`` of a request was made (no image data);
    ``made_with``: the model's name (``model``) and the server's ``levers``."""
    record = {
        "model": made_with["model"],
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt,
        "seed": params.seed,
        "image_index": index,
        "steps": params.steps,
        "guidance_scale": params.guidance_scale,
        "size": f"{params.width}x{params.height}",
    }
    if params.loras:
        record["lora"] = [{"name": name, "scale": scale} for name, scale in params.loras]
    if params.edit is not None:
        record["edit"] = {"strength": params.edit.strength, "masked": params.edit.mask is not None}
    record.update((key, value) for key, value in made_with.items() if key != "model")
    return record


def png_info(record: dict) -> PngInfo:
    info = PngInfo()
    info.add_text("parameters", json.dumps(record, ensure_ascii=False))
    info.add_text("Software", SOFTWARE)
    source = source_type("edit" in record)
    xmp = _XMP.format(source=quoteattr(source), tool=quoteattr(SOFTWARE))
    info.add_itxt("XML:com.adobe.xmp", xmp)
    return info


def _png(image: Image.Image, info: PngInfo | None = None) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def encode_png(image: Image.Image, record: dict | None,
               signer: ManifestSigner | None = None, parent: Parent | None = None) -> bytes:
    """The PNG, with the provenance chunks of ``record`` (none when it is None), signed with
    a C2PA manifest when there is a ``signer``; ``parent``: what an edit was made from."""
    png = _png(image, None if record is None else png_info(record))
    return png if signer is None else signer.sign(png, record, parent)


# c2pa's settings for every read and signature here:
# - no remote manifests: an upload's XMP may name its manifest by address
#   (``dcterms:provenance``), which c2pa's defaults fetch. That would be a request from the
#   pod to wherever the client points, and a worker thread held until it answers. Such an
#   upload is named by its decoded picture, as one with a manifest inside is;
# - no thumbnails: of the result they would only repeat it, and of an edit's upload they
#   would carry the picture the edit changed.
C2PA_SETTINGS = {"verify": {"remote_manifest_fetch": False},
                 "builder": {"thumbnail": {"enabled": False}}}


@dataclass(frozen=True, eq=False)
class Parent:
    """What a signed edit names as its parent ingredient: a file and its media type."""

    data: bytes
    media_type: str


def parent_of(upload: bytes, media_type: str, image: Image.Image) -> Parent:
    """The upload as sent when it is a file c2pa reads and carries no manifest; else
    ``image``, the decoded picture at the size the edit runs at, as a PNG (see the module's
    note). Worked out once, as the edit is accepted: not once per image it makes."""
    import c2pa

    with c2pa.Context.from_dict(C2PA_SETTINGS) as context:
        try:
            with c2pa.Reader(media_type, io.BytesIO(upload), context=context):
                pass  # a manifest of its own, thumbnail and all
        except c2pa.C2paError.ManifestNotFound:
            return Parent(upload, media_type)
        except c2pa.C2paError:
            pass  # a manifest elsewhere, or a file c2pa does not take as an ingredient
    return Parent(_png(image), "image/png")


class SigningError(ValueError):
    """The signing certificate or key cannot sign; the message says which file and why."""


class _Signers:
    """Native signers of one certificate and key. They are not shared between threads:
    each signature takes an idle one (or makes one), so concurrent responses, each perhaps
    waiting on the timestamp server's round trip, sign side by side. At most one per
    encoding thread exists. ``valid``: when the whole chain is valid, from its latest
    not-before to its earliest not-after."""

    def __init__(self, info, valid: tuple[datetime.datetime, datetime.datetime]):
        self._info, self.valid = info, valid
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        self.made = 0

    def _make(self):
        import c2pa

        made = c2pa.Signer.from_info(self._info), c2pa.Context.from_dict(C2PA_SETTINGS)
        self.made += 1
        return made

    @contextlib.contextmanager
    def borrowed(self):
        try:
            signer, context = self._idle.get_nowait()
        except queue.Empty:
            signer, context = self._make()
        try:
            yield signer, context
        finally:
            self._idle.put((signer, context))


def _stamp(*paths: Path) -> tuple | None:
    try:
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in map(Path.stat, paths))
    except OSError:
        return None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class ManifestSigner:
    """Signs PNGs with a C2PA manifest, with the certificate chain (leaf first) and key given.

    Made at start, where a certificate that cannot sign stops the server (a signature that
    silently went missing would be worse than none promised). The files are read again when
    they change (cert-manager renews the Secret, the kubelet swaps the mounted files): a pair
    that passes a test signature replaces the old one; one that does not (a certificate
    written before its key, a timestamp server down at that moment) is logged and tried
    again every ``RETRY_S``, the old pair signing meanwhile. ``check`` says why the pair in
    use cannot sign now (its chain expired), so the server refuses before the GPU work and
    ``/readyz`` takes the pod out of service, rather than each request failing after it.
    """

    RETRY_S = 30.0

    def __init__(self, cert_file: Path, key_file: Path, algorithm: str = "es256",
                 timestamp_url: str | None = None):
        import c2pa

        self._files = cert_file, key_file
        self._alg = getattr(c2pa.C2paSigningAlg, algorithm.upper(), None)
        if self._alg is None:
            raise SigningError(f"c2pa_algorithm {algorithm!r} is not one c2pa signs with")
        self._timestamp_url = timestamp_url.encode() if timestamp_url else None
        self._lock = threading.Lock()
        self._stamp = _stamp(*self._files)
        self._signers = self._load()
        # The files' last stamp that failed to load, and when it may be tried again.
        self._tried: tuple | None = None
        self._retry_at = 0.0

    @property
    def signers_made(self) -> int:
        """How many native signers the pair in use has (at most the number that ever signed
        at once)."""
        return self._signers.made

    def _load(self) -> _Signers:
        """The files' pair, once a test signature shows it signs."""
        import c2pa

        cert_file, key_file = self._files
        try:
            chain, key = cert_file.read_bytes(), key_file.read_bytes()
        except OSError as exc:
            raise SigningError(f"cannot read {exc.filename}: {exc.strerror}") from exc
        try:
            certificates = x509.load_pem_x509_certificates(chain)
        except ValueError as exc:
            raise SigningError(f"{cert_file} holds no PEM certificate: {exc}") from exc
        valid = (max(c.not_valid_before_utc for c in certificates),
                 min(c.not_valid_after_utc for c in certificates))
        try:
            # c2pa takes PKCS#8 keys only; cert-manager writes PKCS#1 (RSA) or SEC1 (EC)
            # unless told otherwise (privateKey.encoding).
            key = serialization.load_pem_private_key(key, password=None).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption())
        except (ValueError, TypeError) as exc:
            raise SigningError(f"{key_file} holds no unencrypted PEM private key: {exc}") from exc
        signers = _Signers(c2pa.C2paSignerInfo(self._alg, chain, key, self._timestamp_url),
                           valid)
        try:
            self._sign_with(signers, _png(Image.new("RGB", (8, 8))), None, None)
        except Exception as exc:
            raise SigningError(f"{cert_file} and {key_file} cannot sign: {exc}") from exc
        return signers

    def _current(self) -> _Signers:
        """The pair in use, after reading the files again where they changed. One thread
        reads them; the others sign on with the old pair meanwhile."""
        stamp = _stamp(*self._files)
        if stamp == self._stamp or not self._lock.acquire(blocking=False):
            return self._signers
        try:
            if stamp == self._tried and time.monotonic() < self._retry_at:
                return self._signers
            self._tried, self._retry_at = stamp, time.monotonic() + self.RETRY_S
            try:
                self._signers = self._load()
            except SigningError as exc:
                log.error("the signing certificate changed but cannot sign: %s; signing on "
                          "with the pair read before, and trying again in %.0f s",
                          exc, self.RETRY_S)
            else:
                self._stamp = stamp
                log.info("signing certificate %s read again", self._files[0])
            return self._signers
        finally:
            self._lock.release()

    def check(self) -> str | None:
        """Why the pair in use cannot sign now (outside its chain's validity), or None; the
        files are read again first where they changed. No signature: a stat and a clock."""
        not_before, not_after = self._current().valid
        now = _now()
        if now >= not_after:
            return f"the signing certificate expired at {not_after.isoformat()}"
        if now < not_before:
            return f"the signing certificate is valid from {not_before.isoformat()} only"
        return None

    def sign(self, png: bytes, record: dict | None, parent: Parent | None = None) -> bytes:
        """``png`` with a signed manifest: created by a model, or opened from ``parent``
        (hashed as the parent ingredient, not embedded) and edited by one."""
        return self._sign_with(self._current(), png, record, parent)

    @staticmethod
    def _sign_with(signers: _Signers, png: bytes, record: dict | None,
                   parent: Parent | None) -> bytes:
        import c2pa

        made = {"digitalSourceType": source_type(parent is not None),
                "softwareAgent": {"name": "imagegen-server", "version": __version__}}
        if record is not None:
            made["parameters"] = {"model": record["model"]}
        if parent is None:
            actions = [{"action": "c2pa.created", **made}]
        else:
            actions = [{"action": "c2pa.opened", "parameters": {"ingredientIds": ["upload"]}},
                       {"action": "c2pa.edited", **made}]
        manifest = {
            "claim_generator_info": [{"name": "imagegen-server", "version": __version__}],
            "format": "image/png",
            "assertions": [{"label": "c2pa.actions", "data": {"actions": actions}}],
        }
        out = io.BytesIO()
        with signers.borrowed() as (signer, context), \
                c2pa.Builder(manifest, context=context) as builder:
            if parent is not None:
                builder.add_ingredient(
                    {"title": "upload", "relationship": "parentOf", "label": "upload"},
                    parent.media_type, io.BytesIO(parent.data))
            builder.sign(signer, "image/png", io.BytesIO(png), out)
        return out.getvalue()
