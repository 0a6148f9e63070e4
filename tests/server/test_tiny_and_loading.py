"""make-tiny-model output, model URIs and family detection."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline

from imagegen_server.cli import main
from imagegen_server.config import Family, ServerSettings
from imagegen_server.loading import ModelError, detect_family, load_model, resolve_model_uri
from imagegen_server.tiny import parameter_count

PIPELINE_CLASSES = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*.safetensors")):
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("family", list(PIPELINE_CLASSES))
def test_tiny_models_load_with_diffusers_and_generate(tiny_models, reference_pipeline, family):
    index = json.loads((tiny_models[family] / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINE_CLASSES[family]
    pipe = reference_pipeline(family)
    assert type(pipe).__name__ == PIPELINE_CLASSES[family]
    assert sum(parameter_count(pipe).values()) < 300_000
    image = pipe(
        "a cat",
        width=64,
        height=64,
        num_inference_steps=1,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


def test_cli_make_tiny_model_is_deterministic(tmp_path, tiny_models, capsys):
    assert main(["make-tiny-model", str(tmp_path / "a"), "--family", "sd15"]) == 0
    assert str(tmp_path / "a") in capsys.readouterr().out
    main(["make-tiny-model", str(tmp_path / "b"), "--family", "sd15", "--seed", "1"])
    assert _digest(tmp_path / "a") == _digest(tiny_models["sd15"])  # same seed, same bytes
    assert _digest(tmp_path / "b") != _digest(tmp_path / "a")


def test_small_size_is_about_a_million_parameters_at_128(tmp_path):
    main(["make-tiny-model", str(tmp_path), "--family", "sd15", "--size", "small"])
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    unet_params = parameter_count(pipe)["unet"]
    assert 500_000 < unet_params < 2_000_000
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 128


def test_resolve_model_uris(tmp_path, tiny_models):
    model = tiny_models["sd15"]
    pvc_root, gcs_root = tmp_path / "pvc", tmp_path / "gcs"
    (pvc_root / "claim" / "models").mkdir(parents=True)
    (pvc_root / "claim" / "models" / "sd").symlink_to(model)
    (gcs_root / "bucket").mkdir(parents=True)
    (gcs_root / "bucket" / "sd").symlink_to(model)
    s = ServerSettings(pvc_root=pvc_root, gcs_root=gcs_root)
    assert resolve_model_uri(str(model), s) == model
    assert resolve_model_uri(f"file://{model}", s) == model
    assert resolve_model_uri("pvc://claim/models/sd", s) == pvc_root / "claim/models/sd"
    assert resolve_model_uri("gs://bucket/sd", s) == gcs_root / "bucket/sd"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "no model given"),
        ("s3://bucket/model", "unsupported URI scheme 's3'"),
        ("file://relative/path", "must be absolute"),
        ("pvc://claim/missing", "holds no model_index.json"),
        ("hf://no-such-org/no-such-model", "cannot fetch hf://"),
    ],
)
def test_bad_model_uris(tmp_path, monkeypatch, uri, message):
    import huggingface_hub

    # Never reach out from tests. The hub client reads HF_HUB_OFFLINE once, at import.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=message):
        resolve_model_uri(uri, ServerSettings(pvc_root=tmp_path, hf_cache_dir=tmp_path / "hf"))


@pytest.mark.parametrize(("name", "current", "want"), [
    ("auto", 0, "cuda:0"), ("cuda", 1, "cuda:1"), ("cuda:2", 0, "cuda:2"), ("cpu", 0, "cpu"),
])
def test_a_cuda_device_is_resolved_with_its_index(monkeypatch, name, current, want):
    # Each stage thread calls torch.cuda.set_device(device), which refuses an index-less
    # "cuda" ("Expected a torch.device with a specified index"): no GPU server would start.
    import torch

    from imagegen_server.loading import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: name != "cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    device = resolve_device(name)
    assert device == torch.device(want)
    if device.type == "cuda":
        assert torch._utils._get_device_index(device) == device.index  # set_device's check


@pytest.mark.parametrize(
    ("class_name", "family"),
    [
        ("StableDiffusionPipeline", Family.SD15),
        ("StableDiffusionXLPipeline", Family.SDXL),
        ("StableDiffusion3Pipeline", Family.SD3),
        ("FluxPipeline", Family.FLUX),
    ],
)
def test_detect_family(tmp_path, class_name, family):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    assert detect_family(tmp_path) == family


@pytest.mark.parametrize("class_name", ["AudioLDMPipeline", ["my_module", "MyPipeline"]])
def test_unknown_pipeline_class_is_refused(tmp_path, class_name):
    # A list names a community pipeline's module and class: code no one has vetted.
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    with pytest.raises(ModelError, match="is not served"):
        detect_family(tmp_path)


def test_family_mismatch_is_refused(tiny_models):
    settings = ServerSettings(model=str(tiny_models["sd15"]), family="SDXL", dtype="float32")
    with pytest.raises(ModelError, match="holds a SD15 model"):
        load_model(settings)


@pytest.mark.parametrize("mode", ["Pipelined", "Stacked"])
def test_bench_cli_reports_throughput(tiny_models, capsys, mode):
    argv = [
        "bench",
        "--model",
        str(tiny_models["sd15"]),
        "--dtype",
        "float32",
        "--stage-mode",
        mode,
    ]
    argv += ["--requests", "6", "--concurrency", "3", "--steps", "2", "--log-level", "warning"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stage_mode"] == mode and report["requests"] == 6
    assert report["images_per_s"] > 0
    assert 0 < report["latency_p50_s"] <= report["latency_p95_s"] <= report["wall_s"]


def hub_cache(cache: Path, repo: str, files: dict[str, bytes]) -> str:
    """A repository as the hub client keeps it in its cache: refs/main -> a snapshot."""
    commit = hashlib.sha1(repo.encode()).hexdigest()
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    for name, data in files.items():
        (base / "snapshots" / commit / name).parent.mkdir(parents=True, exist_ok=True)
        (base / "snapshots" / commit / name).write_bytes(data)
    return commit


def test_a_lora_from_the_hub_is_its_weights_file(tmp_path, monkeypatch):
    """A LoRA repository holds no model_index.json: its safetensors are what is fetched."""
    import huggingface_hub

    from imagegen_server.loading import resolve_lora_uri

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hf"
    hub_cache(cache, "org/diffusers-lora", {"pytorch_lora_weights.safetensors": b"w"})
    hub_cache(cache, "org/one-file", {"ink-style.safetensors": b"w", "sample.png": b"p"})
    hub_cache(cache, "org/many", {"a.safetensors": b"w", "b.safetensors": b"w"})
    settings = ServerSettings(hf_cache_dir=cache)
    found = resolve_lora_uri("hf://org/diffusers-lora", settings)
    assert found.name == "pytorch_lora_weights.safetensors" and found.is_file()
    assert resolve_lora_uri("hf://org/one-file", settings).name == "ink-style.safetensors"
    with pytest.raises(ModelError, match="holds 2 .safetensors files"):
        resolve_lora_uri("hf://org/many", settings)
    with pytest.raises(ModelError, match="cannot fetch hf://org/absent"):
        resolve_lora_uri("hf://org/absent", settings)


def test_a_lora_from_the_hub_fetches_its_one_weights_file_alone(tmp_path, monkeypatch):
    """Where the hub lists a repository's files, only the adapter's is downloaded: not the
    checkpoints beside it, and nothing of a repository of many adapters, which is refused.
    Where the listing fails (an outage), the cache decides. (The listing is a stand-in for
    the hub's answer; the downloads are the hub client's, reading its cache.)"""
    import huggingface_hub

    from imagegen_server.loading import resolve_lora_uri

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hf"
    beside = {"pytorch_lora_weights.safetensors": b"w",
              "unet/diffusion_pytorch_model.safetensors": b"big"}
    many = {"a.safetensors": b"w", "b.safetensors": b"w", "README.md": b"r"}
    hub_cache(cache, "org/beside", beside)
    hub_cache(cache, "org/many", many)
    hub_cache(cache, "org/cached", {"ink [v2].safetensors": b"w"})

    def listing(self, repo_id, **_):
        if repo_id == "org/cached":
            raise OSError("Connection refused")
        return {"org/beside": list(beside), "org/many": list(many)}[repo_id]

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", listing)
    def spied(download, log):
        def spy(*args, **kwargs):
            log.append(args[1] if len(args) > 1 else kwargs.get("allow_patterns"))
            return download(*args, **kwargs)
        return spy

    fetched, whole = [], []
    for name, log in (("hf_hub_download", fetched), ("snapshot_download", whole)):
        monkeypatch.setattr(huggingface_hub, name, spied(getattr(huggingface_hub, name), log))
    settings = ServerSettings(hf_cache_dir=cache)
    found = resolve_lora_uri("hf://org/beside", settings)
    assert found.name == "pytorch_lora_weights.safetensors" and found.read_bytes() == b"w"
    assert (fetched, whole) == (["pytorch_lora_weights.safetensors"], [])
    with pytest.raises(ModelError, match="holds 2 .safetensors files"):
        resolve_lora_uri("hf://org/many", settings)
    assert len(fetched) == 1  # refused from the listing, before any download
    assert resolve_lora_uri("hf://org/cached", settings).name == "ink [v2].safetensors"
    assert whole == [["*.safetensors"]]


def test_a_hub_token_is_read_from_its_file_and_handed_to_the_hub_client(tmp_path, monkeypatch):
    """Gated repositories (FLUX.1-dev, SD 3.5): the token goes to each hub call; an unreadable
    or empty file is said by its path, never its content."""
    import huggingface_hub

    from imagegen_server.loading import resolve_lora_uri

    asked = []

    def refuse(*args, **kwargs):
        asked.append(kwargs.get("token"))
        raise OSError("401 Unauthorized")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files",
                        lambda self, *args, **kwargs: refuse(token=self.token))
    token = tmp_path / "token"
    token.write_text("hf_secret_value\n")
    settings = ServerSettings(hf_cache_dir=tmp_path / "hf", hf_token_file=token)
    with pytest.raises(ModelError, match="cannot fetch hf://org/gated"):
        resolve_model_uri("hf://org/gated", settings)
    with pytest.raises(ModelError, match="cannot fetch hf://org/gated-lora"):
        resolve_lora_uri("hf://org/gated-lora", settings)
    # The model's download, then the LoRA's listing and, that refused, its cached copy's.
    assert asked == ["hf_secret_value"] * 3
    token.write_text("  \n")
    with pytest.raises(ModelError, match="is empty"):
        resolve_model_uri("hf://org/gated", settings)
    missing = ServerSettings(hf_cache_dir=tmp_path / "hf", hf_token_file=tmp_path / "absent")
    with pytest.raises(ModelError, match="cannot read the hub token") as caught:
        resolve_model_uri("hf://org/gated", missing)
    assert "hf_secret_value" not in str(caught.value)


@pytest.mark.parametrize(("uri", "name"), [
    ("hf://org/flux-dev", "flux-dev"), ("hf://org/flux-dev@v1.0", "flux-dev"),
    ("hf://org/flux-dev@refs/pr/1", "flux-dev"), ("gs://bucket/models/sdxl/", "sdxl"),
    ("gs://bucket/team@x/sdxl", "sdxl"),
])
def test_a_model_is_named_for_its_repository_or_folder_not_its_revision(uri, name):
    from imagegen_server.loading import _model_name

    assert _model_name(uri, Path("/unused")) == name


def test_a_copy_of_fp16_variant_weights_only_loads(tiny_models, tmp_path):
    """SDXL's fp16 files are half its bytes: a copy of those alone is a model too."""
    from imagegen_server.loading import weights_variant

    copy = tmp_path / "sd15-fp16"
    DiffusionPipeline.from_pretrained(tiny_models["sd15"]).save_pretrained(copy, variant="fp16")
    assert weights_variant(copy) == "fp16" and weights_variant(tiny_models["sd15"]) is None
    loaded = load_model(ServerSettings(model=str(copy), dtype="float32", device="cpu"))
    assert loaded.pipeline.unet is not None


def test_only_the_pipeline_s_components_say_whether_its_weights_are_a_variant(tmp_path):
    from imagegen_server.loading import weights_variant

    model = tmp_path / "model"
    for folder, files in {"unet": ["diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
                                   "diffusion_pytorch_model.fp16-00002-of-00002.safetensors"],
                          "vae": ["diffusion_pytorch_model.safetensors"],
                          "extras": ["upscaler.fp16.safetensors"]}.items():
        (model / folder).mkdir(parents=True)
        for name in files:
            (model / folder / name).write_bytes(b"")
    (model / "lost+found").mkdir(mode=0)  # a volume's root: not this user's to read
    index = {"_class_name": "StableDiffusionPipeline", "unet": [], "vae": []}
    (model / "model_index.json").write_text(json.dumps(index))
    assert weights_variant(model) == "fp16"  # sharded fp16 files name no ".fp16."
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert weights_variant(model) is None  # "extras" is no component of the pipeline
