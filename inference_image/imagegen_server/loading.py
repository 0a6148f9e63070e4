"""Model URI -> local directory -> loaded diffusers pipeline on the chosen device and dtype."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .config import FAMILIES, DType, Family, ServerSettings

log = logging.getLogger(__name__)

# model_index.json `_class_name` -> family. Only the text-to-image pipelines the server drives.
PIPELINE_FAMILIES: dict[str, Family] = {e.pipeline_class: f for f, e in FAMILIES.items()}


class ModelError(ValueError):
    """The model URI or directory cannot be served; the message says why."""


def resolve_model_uri(uri: str, settings: ServerSettings) -> Path:
    """Map a model URI of the ImageGenService API to a local directory.

    ``pvc://`` and ``gs://`` are mounted by the pod (a PVC volume, the GCS FUSE CSI driver) under
    ``settings.pvc_root`` and ``settings.gcs_root``; ``hf://`` downloads a snapshot when a hub is
    reachable; ``file://`` and plain paths are used as they are.
    """
    if not uri:
        raise ModelError("no model given: set --model or IMAGEGEN_MODEL")
    path = _local_path(uri, settings)
    if not (path / "model_index.json").is_file():
        raise ModelError(f"{uri!r} resolves to {path}, which holds no model_index.json")
    return path


# The name diffusers' training scripts save a LoRA under (save_lora_weights).
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def resolve_lora_uri(uri: str, settings: ServerSettings) -> Path:
    """A LoRA's URI (the model's schemes) -> a .safetensors file, or a directory holding
    diffusers' pytorch_lora_weights.safetensors. A hub repository holds no pipeline: it must
    hold that one or a single other .safetensors file, which is fetched."""
    parsed = urlparse(uri)
    if parsed.scheme == "hf":
        path = _download_hf_lora(parsed.netloc + parsed.path, settings)
        if path.is_dir():  # what the hub's cache holds of it
            found = sorted(str(f.relative_to(path)) for f in path.rglob("*.safetensors"))
            if found:
                path = path / _lora_weights_file(uri, found)
    else:
        path = _local_path(uri, settings)
    if path.is_file() and path.suffix == ".safetensors":
        return path
    if (path / LORA_WEIGHTS).is_file():
        return path
    raise ModelError(
        f"{uri!r} resolves to {path}: neither a .safetensors file nor a directory holding "
        "pytorch_lora_weights.safetensors"
    )


def hf_token(settings: ServerSettings) -> str | None:
    """The access token for gated hub repositories, from its file; None without one (the
    hub client then reads its own environment)."""
    if settings.hf_token_file is None:
        return None
    try:
        token = settings.hf_token_file.read_text().strip()
    except OSError as exc:  # the path and the reason, never the content
        raise ModelError(f"cannot read the hub token {settings.hf_token_file}: "
                         f"{exc.strerror}") from None
    if not token:
        raise ModelError(f"the hub token file {settings.hf_token_file} is empty")
    return token


def _download_hf_lora(repo: str, settings: ServerSettings) -> Path:
    """A hub LoRA repository's weights file, fetched alone where the hub lists the
    repository's files: one holding many adapters, or checkpoints beside its LoRA, is not
    downloaded whole. Where the hub cannot be asked (offline, an outage, a rate limit),
    what the hub client's cache holds of it, a directory."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    repo_id, _, revision = repo.strip("/").partition("@")
    token = hf_token(settings)
    try:
        try:
            listed = HfApi(token=token).list_repo_files(repo_id, revision=revision or None)
        except (RepositoryNotFoundError, RevisionNotFoundError):
            raise  # the hub's answer, not its absence (gated access included)
        except Exception:  # the cache, as a restart during an outage finds it, decides
            listed = None
        if listed is not None:
            return Path(hf_hub_download(repo_id, _lora_weights_file(f"hf://{repo}", listed),
                                        revision=revision or None,
                                        cache_dir=settings.hf_cache_dir, token=token))
        # Its weights only: LoRA repositories often hold sample images, and no model_index.
        return Path(snapshot_download(repo_id, revision=revision or None,
                                      cache_dir=settings.hf_cache_dir, token=token,
                                      allow_patterns=["*.safetensors"]))
    except ModelError:
        raise
    except Exception as exc:  # the hub client raises many kinds; all mean "not available"
        raise ModelError(f"cannot fetch hf://{repo}: {exc}") from exc


def _lora_weights_file(uri: str, names: list[str]) -> str:
    """Of a LoRA repository's files, the one to serve: diffusers' own name, or the only
    .safetensors file there is."""
    if LORA_WEIGHTS in names:
        return LORA_WEIGHTS
    found = sorted(name for name in names if name.endswith(".safetensors"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelError(f"{uri!r} holds no .safetensors file")
    raise ModelError(
        f"{uri!r} holds {len(found)} .safetensors files ({', '.join(found[:5])}) and no "
        f"{LORA_WEIGHTS}: copy the one to serve to a gs:// or pvc:// path and name that")


def _local_path(uri: str, settings: ServerSettings) -> Path:
    """Where a URI's files are on this machine: mounted, in the image, or downloaded."""
    parsed = urlparse(uri)
    scheme = parsed.scheme
    if scheme in ("", "file"):
        if scheme == "file" and parsed.netloc:
            raise ModelError(f"file:// URIs must be absolute (file:///abs/path), got {uri!r}")
        return Path(parsed.path if scheme else uri)
    if scheme == "pvc":
        return settings.pvc_root / parsed.netloc / parsed.path.lstrip("/")
    if scheme == "gs":
        return settings.gcs_root / parsed.netloc / parsed.path.lstrip("/")
    if scheme == "hf":
        return _download_hf(parsed.netloc + parsed.path, settings)
    raise ModelError(f"unsupported URI scheme {scheme!r} in {uri!r}")


def _download_hf(repo: str, settings: ServerSettings) -> Path:
    from diffusers import DiffusionPipeline
    from huggingface_hub import hf_hub_download

    repo_id, _, revision = repo.strip("/").partition("@")
    token = hf_token(settings)
    try:
        # The pipeline's class first: a served one only. diffusers' download would import a
        # community pipeline named there (a list _class_name) to learn its components.
        index = hf_hub_download(repo_id, "model_index.json", revision=revision or None,
                                cache_dir=settings.hf_cache_dir, token=token)
    except Exception as exc:  # the hub client raises many kinds; all mean "not available"
        raise ModelError(f"cannot fetch hf://{repo}: {exc}") from exc
    detect_family(Path(index).parent)
    try:
        # diffusers' own choice of files, as from_pretrained makes it: the components
        # model_index.json names, safetensors only, no fp16 variants and none of the
        # single-file checkpoints many repositories also hold (FLUX.1-dev's 24 GB one).
        local = DiffusionPipeline.download(
            repo_id,
            revision=revision or None,
            cache_dir=settings.hf_cache_dir,
            use_safetensors=True,
            token=token,
        )
    except Exception as exc:  # the hub client raises many kinds; all mean "not available"
        raise ModelError(f"cannot fetch hf://{repo}: {exc}") from exc
    return Path(local)


def detect_family(model_dir: Path) -> Family:
    """The family named by ``model_index.json``'s ``_class_name``."""
    try:
        index = json.loads((model_dir / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {model_dir / 'model_index.json'}: {exc}") from exc
    class_name = index.get("_class_name", "") if isinstance(index, dict) else ""
    if not isinstance(class_name, str) or class_name not in PIPELINE_FAMILIES:
        raise ModelError(
            f"pipeline class {class_name!r} is not served; supported: {', '.join(PIPELINE_FAMILIES)}"
        )
    return PIPELINE_FAMILIES[class_name]


def torch_dtype(dtype: DType):
    import torch

    return {
        DType.BFLOAT16: torch.bfloat16,
        DType.FLOAT16: torch.float16,
        DType.FLOAT32: torch.float32,
    }[dtype]


def resolve_device(name: str):
    """The device ``name`` means, with an index for CUDA: each stage thread makes it its
    current device, and ``torch.cuda.set_device`` takes no index-less one."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass
class LoadedModel:
    pipeline: object
    family: Family
    path: Path
    name: str
    device: object
    dtype: object


def import_libraries() -> None:
    """Import diffusers' pipeline machinery and transformers' model base, which pull in
    torch._dynamo and peft: on a small model most of a start, timed apart from reading the
    weights (the ``imports`` phase of ``startup_seconds``)."""
    import diffusers.pipelines.pipeline_utils  # noqa: F401
    import transformers.modeling_utils  # noqa: F401


class _PromptTextFilter(logging.Filter):
    """diffusers logs the cut-off end of a prompt longer than its text encoder takes, at
    WARNING and through its own stderr handler ("The following part of your input was
    truncated because CLIP can only handle sequences up to 77 tokens: [...]"). A prompt is
    the user's, not the log's: the record keeps only that it happened."""

    def filter(self, record: logging.LogRecord) -> bool:
        if TRUNCATED_PROMPT in str(record.msg):
            record.msg, record.args = PROMPT_CUT_NOTE, ()
        return True


TRUNCATED_PROMPT = "part of your input was truncated"
PROMPT_CUT_NOTE = "a prompt was cut to the length its text encoder takes (its text is not logged)"


def keep_prompts_out_of_logs() -> None:
    """Put the filter on the handlers that write diffusers' records: its own (it does not
    propagate by default) and the root logger's (where it is made to)."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.get_logger("diffusers")  # sets up diffusers' handler if not yet
    for handler in logging.getLogger("diffusers").handlers + logging.getLogger().handlers:
        if not any(isinstance(f, _PromptTextFilter) for f in handler.filters):
            handler.addFilter(_PromptTextFilter())


def load_model(settings: ServerSettings) -> LoadedModel:
    """Resolve, detect and load the pipeline once, on its device, ready for the stage steps."""
    from diffusers import DiffusionPipeline

    keep_prompts_out_of_logs()

    path = resolve_model_uri(settings.model, settings)
    detected = detect_family(path)
    if settings.family not in (Family.AUTO, detected):
        raise ModelError(
            f"family is {settings.family.value} but {path} holds a {detected.value} model"
        )
    device = resolve_device(settings.device)
    dtype = torch_dtype(settings.dtype)
    log.info("loading %s (%s) as %s on %s", path, detected.value, settings.dtype.value, device)
    pipeline = DiffusionPipeline.from_pretrained(path, dtype=dtype, variant=weights_variant(path))
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(device)
    vae = getattr(pipeline, "vae", None)
    if upcasts_vae(detected, dtype, vae):
        # diffusers' SDXL pipelines upcast the VAE around each decode (and an edit's encode)
        # and cast it back, mutating a shared module; with decodes on their own thread it
        # stays float32 instead. The other families' pipelines run it in float16 as loaded.
        vae.to(dtype=_fp32())
    name = settings.model_name or _model_name(settings.model, path)
    return LoadedModel(pipeline, detected, path, name, device, dtype)


def upcasts_vae(family: Family, dtype, vae) -> bool:
    """Whether diffusers' own pipeline of ``family`` runs this VAE in float32 at ``dtype``:
    only SDXL's read ``force_upcast``."""
    return (vae is not None and family == Family.SDXL and dtype == _fp16()
            and bool(getattr(vae.config, "force_upcast", False)))


FP16_VARIANT = re.compile(r"\.fp16[.-]")  # name.fp16.safetensors, or a shard: .fp16-00001-of-


def weights_variant(model_dir: Path) -> str | None:
    """``fp16`` where a component of the pipeline holds only fp16-variant weights (a copy
    made with ``variant="fp16"``, or `hf download --include "*.fp16.*"`: half the bytes of
    SDXL's), which from_pretrained finds only when told; else None. Only the components
    model_index.json names: a volume's root may hold other folders, some unreadable."""
    try:
        components = json.loads((model_dir / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    for name in components:
        try:
            weights = [f.name for f in (model_dir / name).iterdir()
                       if f.suffix in (".safetensors", ".bin")]
        except OSError:  # not a folder, or not one this user may read
            continue
        if weights and all(FP16_VARIANT.search(w) for w in weights):
            return "fp16"
    return None


def _model_name(uri: str, path: Path) -> str:
    # A hub revision first: one may hold slashes itself (hf://org/name@refs/pr/1).
    named = uri.split("@", 1)[0] if uri.startswith("hf://") else uri
    tail = named.rstrip("/").rsplit("/", 1)[-1]
    return tail or path.name


def _fp16():
    import torch

    return torch.float16


def _fp32():
    import torch

    return torch.float32
