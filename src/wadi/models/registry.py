"""The backbone registry: one `Kind` per family of text-to-image models, declaring everything
that differs between them, so that nothing outside this module asks a kind by its name.

A kind says what to load (denoiser, text components, VAE), how prompts are encoded and the
denoiser called (its time input and latent packing included), the shape its pipeline draws
noise in and how latents become pixels, how it is guided, and what its ecosystem reads: the
stock pipeline, the arguments of the pipeline call that reproduce `wadi sample`, the sigmas
that call passes its scheduler, the export formats it supports, and the words and pipeline
classes that recognise it. Adding a backbone is one entry in `KINDS` (its functions in
wadi.models.kinds.<name> when they need more than a line) plus tests.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from wadi.models.conditioning import (call_mmdit, call_pixart, call_sana, call_sdxl, call_unet, empty_sana,
                                      empty_sdxl, encode_sana, encode_sd3, encode_sdxl, encode_states,
                                      encode_states_pooled, meta_cond_mmdit, meta_cond_sdxl, meta_cond_unet)
from wadi.models.guidance import MODES, guided_cfg
from wadi.models.kinds import flux, flux2_klein, qwen_image, z_image
from wadi.models.latents import decode_scaled, image_noise_shape, patch_multiple, pipeline_patch_multiple, vae_scale

if TYPE_CHECKING:
    from wadi.models.backbones import Backbone

EXPORTS = ("pipeline", "adapter", "lora", "lora-kohya", "single-file")


def cfg_off_call(backbone: "Backbone", steps: int) -> dict:
    """The call of a stock pipeline whose CFG switches off below a scale of 1 (SD, SDXL,
    PixArt, SD3, Sana): the student's steps, no guidance, its resolution."""
    return {"num_inference_steps": steps, "guidance_scale": 0.0, "height": backbone.resolution,
            "width": backbone.resolution}


def _with(call: Callable, **extra) -> Callable:
    """`call` plus fixed arguments, and `max_sequence_length` = the backbone's text length
    where the pipeline takes it (extra["max_sequence_length"] = True)."""
    def args(backbone: "Backbone", steps: int) -> dict:
        out = call(backbone, steps)
        for key, value in extra.items():
            out[key] = backbone.max_length if key == "max_sequence_length" else value
        return out

    return args


@dataclass(frozen=True)
class Kind:
    """Everything that differs between backbone families."""

    name: str
    # --- what to load
    denoiser: str  # diffusers class
    subfolder: str  # the denoiser's folder in a pipeline
    encoder: str  # transformers class of the text encoder
    tokenizer: str  # transformers class of the tokenizer
    masked: bool  # the denoiser attends with the tokenizer's mask (T5 / BERT); CLIP kinds attend to all tokens
    vae: str | None  # the diffusers class of the VAE of a latent kind; None: pixels
    targets: tuple[str, str]  # adapter target presets of (student, fake)
    max_length: int | None  # tokenizer length; None: the tokenizer's own
    text: tuple[tuple[str, str], ...] = ()  # more text components (pipeline name, transformers class)
    long_encoder: str = "text_encoder"  # the text component whose token length is max_length
    upcast_vae: bool = False  # decode in float32 under half precision (SDXL's VAE overflows in fp16)
    # --- how it is called
    call: Callable = call_unet  # (backbone, net, x_t, t, cond) -> the velocity / eps / v, in the drawn layout
    encode: Callable = encode_states  # (backbone, prompts, mask_encoder) -> Cond
    empty: Callable | None = None  # (backbone) -> the empty prompt's Cond, where not encode([""])
    # --- latents
    noise_shape: Callable = image_noise_shape  # (backbone) -> the per-image shape the pipeline draws
    image_tokens: Callable | None = None  # (backbone) -> image tokens, for a resolution-dependent shift
    decode: Callable = decode_scaled  # (backbone, x0) -> images in [-1, 1]
    vae_scale: Callable = vae_scale  # (vae) -> pixels per latent
    resolution_multiple: Callable = patch_multiple  # (backbone) -> what a resolution must be a multiple of
    # --- guidance
    guidance: str = "cfg"  # one of guidance.MODES
    guide: Callable = guided_cfg  # (backbone, net, x, t, cond, scale, **options) -> guided prediction, float32
    guidance_of: Callable | None = None  # (backbone) -> its mode, where the model's checkpoint decides (FLUX.1, klein)
    guidance_options: dict = field(default_factory=dict)  # further settings `guide` takes: {name: default}
    # --- the ecosystem
    pipeline: str | None = None  # stock diffusers pipeline; None: loaded by wadi only
    pipeline_extras: dict = field(default_factory=dict)  # components the stock pipeline wants besides ours
    pipeline_call: Callable | None = cfg_off_call  # (backbone, steps) -> the call's arguments besides the prompt
    sigmas: Callable | None = None  # (steps) -> the sigmas the pipeline passes its scheduler; None: none
    steps_mu: Callable | None = None  # (backbone, steps) -> the pipeline's mu where it depends on the steps
    exports: tuple[str, ...] = ("pipeline", "adapter")  # what its ecosystem reads (EXPORTS)
    lora_note: str = ""  # for its LoRA card: the tools besides diffusers that read the diffusers file as it is
    hub_words: tuple[str, ...] = ()  # words that mark its hub ids, lower case
    plan_inputs: tuple[int, Callable] | None = None  # wadi plan: (text tokens, (net, batch, tokens, dtype) -> Cond)
    pipeline_classes: tuple[str, ...] = ()  # model_index.json classes of its pipelines

    def __post_init__(self):
        assert self.guidance in MODES and set(self.exports) <= set(EXPORTS), self.name

    def supports(self, export: str) -> bool:
        return export in self.exports


_UNET_EXPORTS = ("pipeline", "adapter", "lora", "lora-kohya", "single-file")

KINDS: dict[str, Kind] = {
    # Stable Diffusion 1.5 / 2.1: CLIP text states, the UNet attends to all 77 of them.
    "sd": Kind("sd", "UNet2DConditionModel", "unet", "CLIPTextModel", "CLIPTokenizer", masked=False, vae="AutoencoderKL",
               targets=("unet-student", "unet-fake"), max_length=None, pipeline="StableDiffusionPipeline",
               pipeline_extras=dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False),
               exports=_UNET_EXPORTS, pipeline_classes=("StableDiffusionPipeline",), plan_inputs=(77, meta_cond_unet),
               hub_words=("stable-diffusion-v1", "stable-diffusion-2", "sd-v1", "sd15", "sd-1-5", "sd21", "sd2-1",
                          "sd-turbo")),
    # PixArt-alpha: T5 with its attention mask, length 120; eps and variance out. Its
    # pipelines load no LoRA.
    "pixart": Kind("pixart", "PixArtTransformer2DModel", "transformer", "T5EncoderModel", "AutoTokenizer",
                   masked=True, vae="AutoencoderKL", targets=("dit-student", "dit-fake"), max_length=120,
                   call=call_pixart, pipeline="PixArtAlphaPipeline",
                   pipeline_call=_with(cfg_off_call, clean_caption=False, use_resolution_binning=False,
                                       max_sequence_length=True),
                   pipeline_classes=("PixArtAlphaPipeline",), hub_words=("pixart",)),
    # A pixel-space UNet with any transformers encoder and no VAE (the embedded worlds).
    "pixel": Kind("pixel", "UNet2DConditionModel", "unet", "AutoModel", "AutoTokenizer", masked=True, vae=None,
                  targets=("unet-student", "unet-fake"), max_length=None, pipeline_call=None),
    # A pixel-space SD3-class MMDiT with a sentence encoder (token states + their mean as the
    # pooled embedding) and no VAE: the flow-matching world.
    "pixel-mmdit": Kind("pixel-mmdit", "SD3Transformer2DModel", "transformer", "AutoModel", "AutoTokenizer",
                        masked=False, vae=None, targets=("mmdit-student", "mmdit-fake"), max_length=None,
                        call=call_mmdit, encode=encode_states_pooled, pipeline_call=None),
    # SDXL: a UNet on two CLIPs' penultimate states, the second's pooled output and size
    # micro-conditions; zeros for the empty prompt; its VAE decodes in float32.
    "sdxl": Kind("sdxl", "UNet2DConditionModel", "unet", "CLIPTextModel", "CLIPTokenizer", masked=False,
                 vae="AutoencoderKL", targets=("unet-student", "unet-fake"), max_length=None, call=call_sdxl,
                 encode=encode_sdxl, empty=empty_sdxl, upcast_vae=True,
                 text=(("text_encoder_2", "CLIPTextModelWithProjection"), ("tokenizer_2", "CLIPTokenizer")),
                 pipeline="StableDiffusionXLPipeline", exports=_UNET_EXPORTS,
                 pipeline_classes=("StableDiffusionXLPipeline",), hub_words=("stable-diffusion-xl", "sdxl"),
                 plan_inputs=(77, meta_cond_sdxl)),
    # SD3 / SD3.5: an MMDiT on two CLIPs' penultimate states and T5's (length 256), the CLIPs'
    # pooled outputs, a 16-channel VAE with a shift; rectified flow.
    "sd3": Kind("sd3", "SD3Transformer2DModel", "transformer", "CLIPTextModelWithProjection", "CLIPTokenizer",
                masked=False, vae="AutoencoderKL", targets=("mmdit-student", "mmdit-fake"), max_length=256,
                call=call_mmdit, encode=encode_sd3, long_encoder="text_encoder_3",
                text=(("text_encoder_2", "CLIPTextModelWithProjection"), ("tokenizer_2", "CLIPTokenizer"),
                      ("text_encoder_3", "T5EncoderModel"), ("tokenizer_3", "AutoTokenizer")),
                pipeline="StableDiffusion3Pipeline", pipeline_call=_with(cfg_off_call, max_sequence_length=True),
                exports=("pipeline", "adapter", "lora"), pipeline_classes=("StableDiffusion3Pipeline",),
                plan_inputs=(77 + 256, meta_cond_mmdit),
                hub_words=("stable-diffusion-3", "sd3")),
    # Sana: a linear-attention DiT on Gemma-2's states under their mask (length 300, after
    # the pipeline's instruction), the deep-compression autoencoder; rectified flow.
    "sana": Kind("sana", "SanaTransformer2DModel", "transformer", "AutoModel", "AutoTokenizer", masked=True,
                 vae="AutoencoderDC", targets=("sana-student", "sana-fake"), max_length=300, call=call_sana,
                 encode=encode_sana, empty=empty_sana, pipeline="SanaPipeline",
                 pipeline_call=_with(cfg_off_call, use_resolution_binning=False, max_sequence_length=True),
                 exports=("pipeline", "adapter", "lora"), pipeline_classes=("SanaPipeline",), hub_words=("sana",)),
    # FLUX.1 dev / schnell: a double- and single-stream transformer on T5's states (length
    # 512) and CLIP's pooled output, 16-channel latents packed 2x2 with position ids, a
    # resolution-dependent shift (dev); dev takes its guidance as an input, schnell has none.
    # ComfyUI's LoRA loader maps diffusers' transformer.* keys of FLUX onto its own layout
    # (comfy/lora.py, model_lora_keys_unet): the diffusers LoRA serves both, no kohya file.
    "flux": Kind("flux", "FluxTransformer2DModel", "transformer", "CLIPTextModel", "CLIPTokenizer", masked=False,
                 vae="AutoencoderKL", targets=("mmdit-student", "flux-fake"), max_length=512,
                 text=(("text_encoder_2", "T5EncoderModel"), ("tokenizer_2", "AutoTokenizer")),
                 long_encoder="text_encoder_2", call=flux.call, encode=flux.encode, noise_shape=flux.noise_shape,
                 image_tokens=flux.image_tokens, resolution_multiple=flux.resolution_multiple, guidance="embedded",
                 guidance_of=flux.guidance_mode, guide=flux.guide, pipeline="FluxPipeline",
                 pipeline_call=flux.pipeline_call, sigmas=flux.sigmas,
                 exports=("pipeline", "adapter", "lora"), pipeline_classes=("FluxPipeline",),
                 hub_words=("flux.1", "flux1", "flux-1"),
                 lora_note="ComfyUI loads this file as it is (its LoRA loader reads diffusers' keys for FLUX): the "
                           "base model, this LoRA at strength 1, FluxGuidance at the guidance_scale below, CFG 1, "
                           "sampler euler, scheduler simple, the steps below (with its own noise; several steps are "
                           "spaced its own way, expect small differences)"),
    # Z-Image: a single-stream DiT on Qwen3's second-to-last states (chat template, real
    # tokens only), a list of latents, time 1 - sigma with the output negated, a static
    # shift of 3; CFG as its pipeline combines it, with its normalisation and truncation.
    "z-image": Kind("z-image", "ZImageTransformer2DModel", "transformer", "Qwen3Model", "AutoTokenizer", masked=True,
                    vae="AutoencoderKL", targets=("zimage-student", "zimage-fake"), max_length=z_image.MAX_LENGTH,
                    call=z_image.call, encode=z_image.encode, image_tokens=z_image.image_tokens,
                    resolution_multiple=pipeline_patch_multiple, guide=z_image.guide,
                    guidance_options=z_image.GUIDANCE_OPTIONS, pipeline="ZImagePipeline",
                    pipeline_call=z_image.pipeline_call, sigmas=z_image.sigmas, exports=("pipeline", "adapter", "lora"),
                    hub_words=("z-image",), pipeline_classes=("ZImagePipeline",)),
    # FLUX.2 klein: an MMDiT on three of Qwen3's layers side by side, 32-channel latents
    # patchified 2x2 and normalised by the VAE's batch-norm statistics, 4-axis ids, a shift
    # by tokens and steps. The base is guided by CFG; a distilled klein takes none. Its
    # Qwen3 is loaded without the language-model head, whose logits nothing reads.
    "flux2-klein": Kind("flux2-klein", "Flux2Transformer2DModel", "transformer", "Qwen3Model", "AutoTokenizer",
                        masked=False, vae="AutoencoderKLFlux2", targets=("flux2-student", "flux2-fake"),
                        max_length=flux2_klein.MAX_LENGTH, call=flux2_klein.call, encode=flux2_klein.encode,
                        noise_shape=flux2_klein.noise_shape, image_tokens=flux2_klein.image_tokens,
                        decode=flux2_klein.decode, resolution_multiple=pipeline_patch_multiple,
                        guide=flux2_klein.guide, guidance_of=flux2_klein.guidance_mode, pipeline="Flux2KleinPipeline",
                        pipeline_extras=dict(is_distilled=True), pipeline_call=flux2_klein.pipeline_call,
                        sigmas=flux2_klein.sigmas, steps_mu=flux2_klein.mu, exports=("pipeline", "adapter", "lora"),
                        hub_words=("flux.2-klein", "flux2-klein"), pipeline_classes=("Flux2KleinPipeline",)),
    # Qwen-Image: an MMDiT on Qwen2.5-VL's states of the prompt in the pipeline's template
    # (512 tokens, under their mask), 2x2-packed latents, true CFG with a norm rescale, a
    # 3-D causal VAE with latent statistics; rectified flow with a resolution-dependent shift.
    # Its LoRAs load in diffusers; kohya's layout is a UNet's.
    "qwen-image": Kind("qwen-image", "QwenImageTransformer2DModel", "transformer", "Qwen2_5_VLForConditionalGeneration",
                       "Qwen2Tokenizer", masked=True, vae="AutoencoderKLQwenImage",
                       targets=("mmdit-student", "qwen-fake"), max_length=512, call=qwen_image.call,
                       encode=qwen_image.encode, noise_shape=qwen_image.noise_shape,
                       image_tokens=qwen_image.image_tokens, decode=qwen_image.decode, vae_scale=qwen_image.vae_scale,
                       guide=qwen_image.guide, pipeline="QwenImagePipeline", pipeline_call=qwen_image.pipeline_call,
                       sigmas=qwen_image.sigmas, exports=("pipeline", "adapter", "lora"),
                       pipeline_classes=("QwenImagePipeline",), hub_words=("qwen-image",)),
}

# Where a pipeline folder keeps its denoiser, for readers of weights that take any kind's.
DENOISER_SUBFOLDERS = tuple(sorted({k.subfolder for k in KINDS.values()}))


def get_kind(name: str) -> Kind:
    if name not in KINDS:
        raise ValueError(f"unknown backbone kind {name!r}; choose one of {', '.join(KINDS)}")
    return KINDS[name]


def kind_of(model) -> Kind:
    """The first kind whose denoiser class `model` is (UNets are "sd")."""
    for kind in KINDS.values():
        if kind.denoiser == type(model).__name__:
            return kind
    raise ValueError(f"no backbone kind has a {type(model).__name__} denoiser; give the adapter explicit targets")


def _class_name(file: Path) -> str | None:
    try:
        return json.loads(file.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


class IncompleteFolder(ValueError):
    """A pipeline folder of a known kind with some of its components missing."""


def _by_pipeline_class(name: str | None) -> str | None:
    return next((k.name for k in KINDS.values() if name in k.pipeline_classes), None)


def detect_kind(path: str) -> str:
    """The kind of a diffusers pipeline folder or hub id. A folder by its model_index.json's
    pipeline class, else by its contents (the denoiser's subfolder and class, a VAE or not,
    the kind's further text components); a hub id by its cached model_index.json, else by
    the words in its name. What none of these recognises is refused."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return _hub_kind(path)
    pipeline = _class_name(p / "model_index.json")
    shaped = [k for k in KINDS.values()
              if (p / k.subfolder).is_dir() and (p / "vae").is_dir() == bool(k.vae)
              and _class_name(p / k.subfolder / "config.json") in (k.denoiser, None)]
    for k in shaped:  # a kind's folder with some of its components gone is that kind's, incomplete
        lacking = [name for name, _ in k.text if not (p / name).is_dir()]
        if lacking and (len(lacking) < len(k.text) or pipeline in k.pipeline_classes):
            raise IncompleteFolder(f"{path}: a {k.name} pipeline folder without "
                                   f"{', '.join(n + '/' for n in lacking)}; give the complete folder")
    known = _by_pipeline_class(pipeline)
    if known:
        return known
    found = [k.name for k in shaped if all((p / name).is_dir() for name, _ in k.text)]
    if not found:
        raise ValueError(f"{path}: not a diffusers pipeline folder of a known kind "
                         f"({', '.join(KINDS)}): no matching {' or '.join(DENOISER_SUBFOLDERS)}/")
    # A kind that asks for more components is the better match (sd3 over a plain MMDiT).
    return max(found, key=lambda name: len(KINDS[name].text))


def _hub_kind(repo: str) -> str:
    """A hub id's kind: its model_index.json where the local cache has it (no network: the
    loaders fetch what they need later), else the longest known word in its name."""
    from huggingface_hub import try_to_load_from_cache

    try:
        index = try_to_load_from_cache(repo, "model_index.json")
    except Exception:  # not a valid repository id: the loaders name the problem
        index = None
    known = _by_pipeline_class(_class_name(Path(index))) if isinstance(index, str) else None
    if known:
        return known
    lower = repo.lower()
    found = [(len(word), k.name) for k in KINDS.values() for word in k.hub_words if word in lower]
    if not found:
        raise ValueError(f"cannot tell which kind of model {repo!r} is (no model_index.json in the local cache, "
                         f"no known word in its name); give model.kind (--kind): one of {', '.join(KINDS)}")
    return max(found)[1]
