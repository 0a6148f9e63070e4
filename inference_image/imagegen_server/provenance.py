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
accepted), and the chain to the upload's own manifest is not kept.
"""

from __future__ import annotations

import contextlib
import io
import json
import queue
from pathlib import Path
from xml.sax.saxutils import quoteattr

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import __version__
from .request import EditInput, GenerationParams

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


def parameters(params: GenerationParams, model: str, index: int) -> dict:
    """The record of how image ``index`` of a request was made (no image data)."""
    record = {
        "model": model,
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
               signer: ManifestSigner | None = None, parent: EditInput | None = None) -> bytes:
    """The PNG, with the provenance chunks of ``record`` (none when it is None), signed with
    a C2PA manifest when there is a ``signer``; ``parent``: the edit it was made from."""
    png = _png(image, None if record is None else png_info(record))
    return png if signer is None else signer.sign(png, record, parent)


def _parent_file(edit: EditInput) -> tuple[bytes, str]:
    """What an edit names as its parent: the upload as sent when it is a file c2pa reads
    and carries no manifest; else the decoded picture as a PNG (see the module's note)."""
    import c2pa

    if edit.upload is not None:
        media_type = edit.upload_type or "image/png"
        try:
            with c2pa.Reader(media_type, io.BytesIO(edit.upload)):
                pass  # a manifest of its own, thumbnail and all
        except c2pa.C2paError.ManifestNotFound:
            return edit.upload, media_type
        except c2pa.C2paError:
            pass  # a file c2pa does not take as an ingredient
    return _png(edit.image), "image/png"


class SigningError(ValueError):
    """The signing certificate or key cannot sign; the message says which file and why."""


class ManifestSigner:
    """Signs PNGs with a C2PA manifest, with the certificate chain (leaf first) and key given.

    Built once at start, where a certificate that cannot sign stops the server (a signature
    that silently went missing would be worse than none promised).
    """

    def __init__(self, cert_file: Path, key_file: Path, algorithm: str = "es256",
                 timestamp_url: str | None = None):
        import c2pa

        try:
            chain, key = cert_file.read_bytes(), key_file.read_bytes()
        except OSError as exc:
            raise SigningError(f"cannot read {exc.filename}: {exc.strerror}") from exc
        alg = getattr(c2pa.C2paSigningAlg, algorithm.upper(), None)
        if alg is None:
            raise SigningError(f"c2pa_algorithm {algorithm!r} is not one c2pa signs with")
        info = c2pa.C2paSignerInfo(alg, chain, key,
                                   timestamp_url.encode() if timestamp_url else None)

        def signer_and_context():
            # No thumbnails: of the result they would only repeat it, and of an edit's
            # upload they would carry the picture the edit changed.
            made = (c2pa.Signer.from_info(info),
                    c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}}}))
            self._made.append(made)
            return made

        self._make = signer_and_context
        # Native signers are not shared between threads: each signature takes an idle one
        # (or makes one), so concurrent responses, each perhaps waiting on the timestamp
        # server's round trip, sign side by side. At most one per encoding thread exists.
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        self._made: list = []
        try:
            self._idle.put(self._make())
        except c2pa.C2paError as exc:
            raise SigningError(f"{cert_file} and {key_file} cannot sign: {exc}") from exc
        try:
            self.sign(_png(Image.new("RGB", (8, 8))), None)
        except Exception as exc:
            raise SigningError(f"{cert_file} and {key_file} cannot sign: {exc}") from exc

    @property
    def signers_made(self) -> int:
        """How many native signers exist (at most the number that ever signed at once)."""
        return len(self._made)

    @contextlib.contextmanager
    def _borrowed(self):
        try:
            signer, context = self._idle.get_nowait()
        except queue.Empty:
            signer, context = self._make()
        try:
            yield signer, context
        finally:
            self._idle.put((signer, context))

    def sign(self, png: bytes, record: dict | None, parent: EditInput | None = None) -> bytes:
        """``png`` with a signed manifest: created by a model, or opened from ``parent``'s
        upload (hashed as the parent ingredient, not embedded) and edited by one."""
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
        if parent is not None:
            upload, media_type = _parent_file(parent)
        out = io.BytesIO()
        with self._borrowed() as (signer, context), \
                c2pa.Builder(manifest, context=context) as builder:
            if parent is not None:
                builder.add_ingredient(
                    {"title": "upload", "relationship": "parentOf", "label": "upload"},
                    media_type, io.BytesIO(upload))
            builder.sign(signer, "image/png", io.BytesIO(png), out)
        return out.getvalue()
