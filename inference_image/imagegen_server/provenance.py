"""What a generated PNG says about itself: how it was made, and that a model made it.

Each PNG carries, unless the server is told not to (``provenance=false``):

- a ``parameters`` text chunk: the generation parameters as JSON (prompt, negative prompt,
  seed, steps, guidance, size, model, and for an edit its strength and whether it was masked);
- an XMP packet (the ``XML:com.adobe.xmp`` iTXt chunk) with IPTC's digital source type
  ``trainedAlgorithmicMedia``, the machine-readable "made by a generative model" mark that
  IPTC defines and C2PA and the major platforms read
  (https://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia);
- ``Software``: this server and its version.

Metadata is not a watermark: anyone can strip or rewrite it; a signed C2PA manifest is what
makes tampering detectable.
"""

from __future__ import annotations

import io
import json
from xml.sax.saxutils import quoteattr

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import __version__
from .request import GenerationParams

TRAINED_ALGORITHMIC_MEDIA = (
    "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
)
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
    if params.edit is not None:
        record["edit"] = {"strength": params.edit.strength, "masked": params.edit.mask is not None}
    return record


def png_info(record: dict) -> PngInfo:
    info = PngInfo()
    info.add_text("parameters", json.dumps(record, ensure_ascii=False))
    info.add_text("Software", SOFTWARE)
    xmp = _XMP.format(source=quoteattr(TRAINED_ALGORITHMIC_MEDIA), tool=quoteattr(SOFTWARE))
    info.add_itxt("XML:com.adobe.xmp", xmp)
    return info


def encode_png(image: Image.Image, record: dict | None) -> bytes:
    """The PNG, with the provenance chunks of ``record`` (none when it is None)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=None if record is None else png_info(record))
    return buffer.getvalue()
