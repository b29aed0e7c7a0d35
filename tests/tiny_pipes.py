"""Tiny SD-, PixArt- and pixel-shaped pipelines saved to disk the way users' folders are,
so tests load them back by path through the real loaders. Tokenizers are built from
hand-written vocabularies: nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import TINY_PIXART, TINY_UNET
from diffusers import AutoencoderKL, DDPMScheduler, PixArtTransformer2DModel, UNet2DConditionModel
from transformers import (BertConfig, BertModel, BertTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config,
                          T5EncoderModel)

from wadi.adapters.core import AdapterConfig
from wadi.engine.config import DataConfig, DistillConfig, RunConfig, TrainConfig
from wadi.models.backbones import BackboneSpec

WORDS = ["a", "photo", "of", "cat", "dog", "red", "car", "the", "digit", "seven", "on", "table"]


def _scheduler(prediction_type="epsilon") -> DDPMScheduler:
    """Stable Diffusion's schedule (abar_999 = 0.00466)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type=prediction_type)


def _pixart_scheduler() -> DDPMScheduler:
    """PixArt-alpha's linear schedule (abar_999 = 4.0e-5, far from the generator's 0.0047)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")


def _vae() -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=16)


def _clip_tokenizer(folder: Path) -> CLIPTokenizer:
    # BPE with no merges over a-z: every word becomes its letters (others map to unk).
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def _bert_tokenizer(folder: Path, max_length: int) -> BertTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"), model_max_length=max_length)


# SD 2.1's differences from 1.5: Linear projections in the transformers, per-block head
# sizes, and v-prediction (the 768 px model).
SD21_UNET = dict(use_linear_projection=True, attention_head_dim=(4, 8))


def save_tiny_sd(folder: Path, seed: int = 0, prediction_type: str = "epsilon", **unet) -> Path:
    torch.manual_seed(seed)
    tok = _clip_tokenizer(folder / "tokenizer")
    tok.save_pretrained(folder / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                 num_hidden_layers=2, max_position_embeddings=16)).save_pretrained(folder / "text_encoder")
    UNet2DConditionModel(**{**TINY_UNET, **unet}).save_pretrained(folder / "unet")
    _vae().save_pretrained(folder / "vae")
    _scheduler(prediction_type).save_pretrained(folder / "scheduler")
    return folder


def save_tiny_pixart(folder: Path, seed: int = 0, **transformer) -> Path:
    torch.manual_seed(seed)
    tok = _bert_tokenizer(folder / "tokenizer", max_length=12)
    tok.save_pretrained(folder / "tokenizer")
    T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)) \
        .save_pretrained(folder / "text_encoder")
    PixArtTransformer2DModel(**{**TINY_PIXART, **transformer}).save_pretrained(folder / "transformer")
    _vae().save_pretrained(folder / "vae")
    _pixart_scheduler().save_pretrained(folder / "scheduler")
    return folder


def save_tiny_pixel(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tok = _bert_tokenizer(folder / "tokenizer", max_length=8)
    tok.save_pretrained(folder / "tokenizer")
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=16)).save_pretrained(folder / "text_encoder")
    UNet2DConditionModel(**{**TINY_UNET, "in_channels": 1, "out_channels": 1}).save_pretrained(folder / "unet")
    _scheduler().save_pretrained(folder / "scheduler")
    return folder


def save_tiny_pixel_mmdit(folder: Path, seed: int = 0, shift: float = 1.0) -> Path:
    """A rectified-flow SD3-class transformer over 8x8 one-channel pixels (the flow world's shape)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(seed)
    tok = _bert_tokenizer(folder / "tokenizer", max_length=8)
    tok.save_pretrained(folder / "tokenizer")
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=16)).save_pretrained(folder / "text_encoder")
    SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=1, out_channels=1, num_layers=2,
                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                          pooled_projection_dim=32, pos_embed_max_size=8).save_pretrained(folder / "transformer")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).save_pretrained(folder / "scheduler")
    return folder


def save_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """Two CLIPs (the second with a projection), a UNet with SDXL's text_time embedding and
    per-block transformer depth, SD's schedule."""
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    for i, name in enumerate(("", "_2")):
        tok = _clip_tokenizer(folder / f"tokenizer{name}")
        tok.save_pretrained(folder / f"tokenizer{name}")
        cls = CLIPTextModelWithProjection if name else CLIPTextModel
        cls(CLIPTextConfig(vocab_size=len(tok), hidden_size=16 + 8 * i, intermediate_size=37, num_attention_heads=4,
                           num_hidden_layers=2, max_position_embeddings=16, projection_dim=24)
            ).save_pretrained(folder / f"text_encoder{name}")
    UNet2DConditionModel(**{**TINY_UNET, "cross_attention_dim": 40, "transformer_layers_per_block": (2, 1),
                            "use_linear_projection": True, "addition_embed_type": "text_time",
                            "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 6 * 8 + 24}
                         ).save_pretrained(folder / "unet")
    _vae().save_pretrained(folder / "vae")
    _scheduler().save_pretrained(folder / "scheduler")
    return folder


def _flow_scheduler(shift: float, sana: bool = False):
    """The stock schedulers of the flow families: SD3's flow-matching Euler, Sana's DPM-Solver
    in flow mode (both shift 3.0)."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    if sana:
        return DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def save_tiny_sd3(folder: Path, seed: int = 0) -> Path:
    """Two CLIPs with projections, T5 (length 8), a 16-channel VAE with shift and scale."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    for i, name in enumerate(("", "_2")):
        tok = _clip_tokenizer(folder / f"tokenizer{name}")
        tok.save_pretrained(folder / f"tokenizer{name}")
        CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=16 + 8 * i, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=16, projection_dim=16 + 8 * i)).save_pretrained(folder / f"text_encoder{name}")
    tok = _bert_tokenizer(folder / "tokenizer_3", max_length=8)
    tok.save_pretrained(folder / "tokenizer_3")
    T5EncoderModel(T5Config(vocab_size=len(tok), d_model=48, d_kv=8, d_ff=37, num_layers=2, num_heads=4)) \
        .save_pretrained(folder / "text_encoder_3")
    SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=16,
                          pooled_projection_dim=40, pos_embed_max_size=8).save_pretrained(folder / "transformer")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=8, sample_size=16, shift_factor=0.0609, scaling_factor=1.5305,
                  use_quant_conv=False, use_post_quant_conv=False).save_pretrained(folder / "vae")
    _flow_scheduler(3.0).save_pretrained(folder / "scheduler")
    return folder


def save_tiny_sana(folder: Path, seed: int = 0) -> Path:
    """Gemma-2 (a word-level tokenizer, length 8), a linear-attention Sana transformer, a
    deep-compression autoencoder; 32 px (SanaPipeline takes multiples of 32)."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma2Config, Gemma2Model, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    words = ["<pad>", "<unk>", "<bos>", "<eos>"] + WORDS + ["user", "prompt", "enhanced", "the", "and", "a", "cat"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                  eos_token="<eos>", model_max_length=8)
    tok.save_pretrained(folder / "tokenizer")
    Gemma2Model(Gemma2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                             pad_token_id=0)).save_pretrained(folder / "text_encoder")
    SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                           num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                           caption_channels=32, sample_size=16, patch_size=1).save_pretrained(folder / "transformer")
    AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=4, encoder_block_types=("ResBlock", "ResBlock"),
                  decoder_block_types=("ResBlock", "ResBlock"), encoder_block_out_channels=(8, 16),
                  decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                  encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()), upsample_block_type="interpolate",
                  downsample_block_type="Conv", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                  scaling_factor=0.41407).save_pretrained(folder / "vae")
    _flow_scheduler(3.0, sana=True).save_pretrained(folder / "scheduler")
    return folder


def make_cfg(pipes: dict, tmp_path: Path, kind: str = "sd", student: str = "lorad", steps: int = 3,
             **train) -> DistillConfig:
    """A tiny run of `kind` (sd, sd21, pixart, pixel, pixel-mmdit) on the pipelines in `pipes`."""
    family = {"pixart": "dit", "pixel-mmdit": "mmdit", "sd3": "mmdit", "sana": "sana"}.get(kind, "unet")
    return DistillConfig(
        model=BackboneSpec(kind="sd" if kind == "sd21" else kind, path=str(pipes[kind]),
                           resolution=None if kind.startswith("pixel") else 32 if kind == "sana" else 16),
        student=AdapterConfig(student, 4, f"{family}-student"), fake=AdapterConfig("lorad", 2, f"{family}-fake"),
        data=DataConfig(prompts=str(pipes["prompts"]), sample_prompts=["a cat"]),
        train=TrainConfig(**{"steps": steps, "batch_size": 2, **train}),
        run=RunConfig(root=str(tmp_path / "runs"), checkpoint_every=1, keep_checkpoints=10, sample_every=0,
                      log_every=1, sample_seeds=[0]))


def save_template(base: Path, path: Path, **changes) -> Path:
    """The base as a complete original single-file checkpoint at `path` (UNet, VAE, text
    encoders; SDXL's second in OpenCLIP's layout), after checking that diffusers' own
    conversions read each part back to the same tensors. `changes` = {key: factor} scales
    those original keys afterwards (a template that is not the base)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    def same(back: dict, module) -> None:
        assert all(torch.equal(back[k].reshape(v.shape), v) for k, v in module.state_dict().items())

    teacher = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    template, vae_part = original_layout(teacher), vae_layout(vae)
    back = convert_ldm_unet_checkpoint(template, dict(teacher.config))
    same(back, teacher)
    assert len(back) == len(template)
    same(convert_ldm_vae_checkpoint(vae_part, dict(vae.config)), vae)
    template.update(vae_part)
    sdxl = (base / "text_encoder_2").is_dir()
    clip = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    prefix = "conditioner.embedders.0.transformer." if sdxl else "cond_stage_model.transformer."
    # The original keys are transformers' older ones, under text_model. (5.6 flattened CLIPTextModel).
    clip_part = {prefix + ("" if k.startswith("text_model.") else "text_model.") + k: v.clone()
                 for k, v in clip.state_dict().items()}
    same({k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(clip_part).items()}, clip)
    template.update(clip_part)
    if sdxl:
        big = CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2")
        big_part = open_clip_layout(big, "conditioner.embedders.1.model.")
        same(convert_open_clip_checkpoint(big, big_part, "conditioner.embedders.1.model."), big)
        template.update(big_part)
    for key, factor in changes.items():
        template[key] = template[key] * factor
    save_file(template, str(path), metadata={"modelspec.title": "tiny base", "modelspec.license": "test"})
    return path


def vae_layout(vae) -> dict:
    """An AutoencoderKL's tensors under the original checkpoint's keys (first_stage_model.*);
    save_template checks them with diffusers' conversion back."""
    import re

    last = len(vae.config.up_block_types) - 1
    renames = [(r"down_blocks\.(\d+)\.resnets\.", lambda m: f"down.{m[1]}.block."),
               (r"down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"down.{m[1]}.downsample."),
               (r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{last - int(m[1])}.block."),
               (r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{last - int(m[1])}.upsample."),
               (r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}."),
               (r"mid_block\.attentions\.0\.", lambda m: "mid.attn_1."),
               (r"conv_norm_out", lambda m: "norm_out"), (r"conv_shortcut", lambda m: "nin_shortcut"),
               (r"attn_1\.group_norm", lambda m: "attn_1.norm"), (r"attn_1\.to_out\.0", lambda m: "attn_1.proj_out"),
               (r"attn_1\.to_([qkv])\.", lambda m: f"attn_1.{m[1]}.")]
    out = {}
    for name, tensor in vae.state_dict().items():
        for pattern, new in renames:
            name = re.sub(pattern, new, name)
        if "attn_1." in name and tensor.ndim == 2:  # the original's 1x1 convolutions
            tensor = tensor[:, :, None, None]
        out[f"first_stage_model.{name}"] = tensor.clone()
    return out


def open_clip_layout(text_model, prefix: str) -> dict:
    """A transformers CLIP text model under OpenCLIP's keys (q, k, v fused, the projection
    transposed), by inverting diffusers' own table of the renames."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    table = DIFFUSERS_TO_LDM_MAPPING["openclip"]
    state, out = text_model.state_dict(), {}
    for ours, theirs in table["layers"].items():
        tensor = state.pop(ours)
        out[prefix + theirs] = tensor.T.contiguous() if theirs == "text_projection" else tensor.clone()
    for name in [k for k in state if ".q_proj." in k]:  # q, k and v as one in_proj
        state[name.replace("q_proj.", "in_proj_")] = torch.cat(
            [state.pop(name.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj")])
    for name, tensor in state.items():
        for ours, theirs in table["transformer"].items():
            name = name.replace(ours, theirs)
        out[f"{prefix}transformer.{name}"] = tensor.clone()
    return out


def original_layout(unet) -> dict:
    """A UNet's tensors under the original Stable Diffusion checkpoint's keys
    (model.diffusion_model.*), for tests of the single-file export's template. Written
    out here, and checked by diffusers' own conversion back (see test_ecosystem)."""
    cfg, per = unet.config, unet.config.layers_per_block
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL's
    out = {}
    for name, tensor in unet.state_dict().items():
        parts = name.split(".")
        if ".".join(parts[:-1]) in top:
            new = f"{top['.'.join(parts[:-1])]}.{parts[-1]}"
        elif parts[0] in ("down_blocks", "up_blocks"):
            b, kind, i, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            width = per + 1
            if parts[0] == "down_blocks":
                index = 1 + b * width + (per if kind == "downsamplers" else i)
                block = f"input_blocks.{index}"
                new = {"resnets": f"{block}.0", "attentions": f"{block}.1", "downsamplers": f"{block}.0.op"}[kind]
                rest = rest[1:] if kind == "downsamplers" else rest
            else:
                index = b * width + (per if kind == "upsamplers" else i)
                block = f"output_blocks.{index}"
                has_attention = "CrossAttn" in cfg.up_block_types[b]
                new = {"resnets": f"{block}.0", "attentions": f"{block}.1",
                       "upsamplers": f"{block}.{2 if has_attention else 1}"}[kind]
            if kind == "resnets":
                rest = [resnet.get(rest[0], rest[0]), *rest[1:]]
            new = ".".join([new, *rest])
        else:  # mid_block.resnets.0 / attentions.0 / resnets.1
            index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[".".join(parts[1:3])]
            rest = parts[3:]
            if parts[1] == "resnets":
                rest = [resnet.get(rest[0], rest[0]), *rest[1:]]
            new = ".".join([f"middle_block.{index}", *rest])
        out[f"model.diffusion_model.{new}"] = tensor.clone()
    return out


def stock_images(folder: Path, prompts: list[str], seeds: list[int], output_type: str = "np"):
    """An export's stock pipeline called as its wadi.json says (the pipeline class and the
    call's arguments), one image per (prompt, seed): nothing here knows the kind."""
    import diffusers

    info = json.loads((Path(folder) / "wadi.json").read_text())
    pipe = getattr(diffusers, info["pipeline"]).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompt=list(prompts), generator=generators, output_type=output_type, **info["call"]).images
