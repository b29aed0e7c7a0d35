"""Text conditioning: `Cond`, the batch of a kind's text tensors, and how each backbone
kind encodes prompts and calls its denoiser (the functions `backbones.KINDS` names),
each transcribing its stock diffusers pipeline's default call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from wadi.models.backbones import Backbone


@dataclass
class Cond:
    """Text conditioning for a batch: token states, their mask where the denoiser attends
    with one (T5, Gemma, BERT), and whatever else a kind's denoiser takes (pooled
    embeddings, SDXL's time ids), each batch-first. Every operation treats all of them
    alike, so extra tensors travel through CFG batching, prompt dropout and caching."""

    embeds: torch.Tensor  # (B, L, D)
    mask: torch.Tensor | None = None  # (B, L), 1 for real tokens
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, ...) each

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def _map(self, fn, *others: "Cond") -> "Cond":
        """fn applied to each tensor of self and the same tensor of `others`."""
        mask = None if self.mask is None else fn(self.mask, *(o.mask for o in others))
        return Cond(fn(self.embeds, *(o.embeds for o in others)), mask,
                    {k: fn(v, *(o.extra[k] for o in others)) for k, v in self.extra.items()})

    def cat(self, other: "Cond") -> "Cond":
        return self._map(lambda a, b: torch.cat([a, b]), other)

    def where(self, keep: torch.Tensor, other: "Cond") -> "Cond":
        """Rows of self where keep is True, else rows of other (other may have batch 1)."""
        def pick(a, b):
            return torch.where(keep.view(-1, *[1] * (a.dim() - 1)), a, b.expand_as(a))

        return self._map(pick, other)

    def expand(self, n: int) -> "Cond":
        return self._map(lambda a: a.expand(n, *a.shape[1:]))

    def __getitem__(self, rows) -> "Cond":
        return self._map(lambda a: a[rows])

    @staticmethod
    def stack(rows: list["Cond"]) -> "Cond":
        """One batch from single rows (as `cond[i]` gives them)."""
        return rows[0]._map(lambda *a: torch.stack(a), *rows[1:])

    def to(self, device, dtype=None) -> "Cond":
        """Floating tensors to `dtype`; masks and ids keep theirs."""
        return self._map(lambda a: a.to(device, dtype if a.is_floating_point() else None))


# --- how each kind encodes prompts and calls its denoiser --------------------------------

def call_unet(backbone: "Backbone", net: nn.Module, x_t, t, cond: Cond) -> torch.Tensor:
    return net(x_t, t, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask).sample


def call_pixart(backbone: "Backbone", net: nn.Module, x_t, t, cond: Cond) -> torch.Tensor:
    """PixArt-alpha: 1024 px models take the image size and aspect ratio as micro-conditions
    (as PixArtAlphaPipeline passes them); the output's extra channels are the learned variance."""
    added = {"resolution": None, "aspect_ratio": None}
    if getattr(net, "use_additional_conditions", False):
        size = backbone.resolution
        added = {"resolution": x_t.new_tensor([[size, size]]).expand(len(x_t), 2),
                 "aspect_ratio": x_t.new_tensor([[1.0]]).expand(len(x_t), 1)}
    out = net(x_t, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask, timestep=t,
              added_cond_kwargs=added).sample
    return out[:, : backbone.channels]


def _tokens(backbone: "Backbone", prompts: list[str], which: str = "", max_length: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask of `prompts` by tokenizer{which}, padded to `max_length` (default
    the backbone's), on its encoder's device."""
    device = next(backbone.text[f"text_encoder{which}"].parameters()).device
    tok = backbone.text[f"tokenizer{which}"](list(prompts), padding="max_length", truncation=True,
                                              max_length=max_length or backbone.max_length, return_tensors="pt")
    return tok.input_ids.to(device), tok.attention_mask.to(device)


def encode_states(backbone: "Backbone", prompts: list[str], mask_encoder: bool) -> Cond:
    """One encoder's token states. Kinds whose denoiser attends with the mask (T5, BERT)
    pass it to both; CLIP kinds pass none, as the stock pipelines do, unless
    `mask_encoder` (the authors' training loader): then the encoder masks padding, which
    changes the states at padded positions."""
    ids, mask = _tokens(backbone, prompts)
    if backbone.kind.masked:
        return Cond(backbone.text_encoder(ids, attention_mask=mask)[0], mask)
    return Cond(backbone.text_encoder(ids, attention_mask=mask if mask_encoder else None)[0])


def masks_on_request(kind) -> bool:
    """Whether `data.mask_prompts` changes how a kind encodes: one CLIP whose padding the
    denoiser sees (the others mask always, or never, as their stock pipelines do)."""
    return kind.encode is encode_states and not kind.masked


def encode_states_pooled(backbone: "Backbone", prompts: list[str], mask_encoder: bool) -> Cond:
    """A sentence encoder's token states and their mean over the real tokens (the pooling
    sentence-transformers trains MiniLM with) as the pooled embedding an MMDiT takes."""
    ids, mask = _tokens(backbone, prompts)
    states = backbone.text_encoder(ids, attention_mask=mask)[0]
    m = mask.unsqueeze(-1).to(states.dtype)
    return Cond(states, None, {"pooled": (states * m).sum(1) / m.sum(1).clamp(min=1)})


def encode_sdxl(backbone: "Backbone", prompts: list[str], mask_encoder: bool) -> Cond:
    """As StableDiffusionXLPipeline.encode_prompt by default: both CLIPs' penultimate states
    (77 tokens, no mask) side by side, the second's projected pooled output as
    `text_embeds`, and the micro-conditions (original size, crop corner, target size) as
    `time_ids`, all at the backbone's resolution."""
    states = []
    for which in ("", "_2"):
        ids, _ = _tokens(backbone, prompts, which, backbone.text[f"tokenizer{which}"].model_max_length)
        out = backbone.text[f"text_encoder{which}"](ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
    embeds = torch.cat(states, dim=-1)
    return Cond(embeds, None, {"text_embeds": out[0], "time_ids": _sdxl_time_ids(backbone, len(prompts), embeds)})


def _sdxl_time_ids(backbone: "Backbone", n: int, like: torch.Tensor) -> torch.Tensor:
    size = backbone.resolution
    return like.new_tensor([[size, size, 0, 0, size, size]]).expand(n, 6)


def empty_sdxl(backbone: "Backbone") -> Cond:
    """SDXL's negative prompt: zeroed states and pooled embedding (the pipeline's
    force_zeros_for_empty_prompt, as SDXL was trained to drop text), the same time ids."""
    cond = encode_sdxl(backbone, [""], False)
    return Cond(torch.zeros_like(cond.embeds), None,
                {"text_embeds": torch.zeros_like(cond.extra["text_embeds"]), "time_ids": cond.extra["time_ids"]})


def call_sdxl(backbone: "Backbone", net: nn.Module, x_t, t, cond: Cond) -> torch.Tensor:
    return net(x_t, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=cond.extra).sample


def encode_sd3(backbone: "Backbone", prompts: list[str], mask_encoder: bool) -> Cond:
    """As StableDiffusion3Pipeline.encode_prompt by default: each CLIP's penultimate states
    (77 tokens, no mask) side by side and zero-padded to T5's width, followed by T5's
    states (max_length tokens, no mask); the two CLIPs' projected pooled outputs side by side."""
    states, pooled = [], []
    for which in ("", "_2"):
        ids, _ = _tokens(backbone, prompts, which, backbone.text[f"tokenizer{which}"].model_max_length)
        out = backbone.text[f"text_encoder{which}"](ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled.append(out[0])
    ids, _ = _tokens(backbone, prompts, "_3")
    t5 = backbone.text["text_encoder_3"](ids)[0]
    clip = torch.cat(states, dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return Cond(torch.cat([clip, t5.to(clip.dtype)], dim=-2), None, {"pooled": torch.cat(pooled, dim=-1)})


# The instruction SanaPipeline puts before every prompt by default (not before the empty
# negative prompt), so that Gemma's states describe an enhanced prompt.
SANA_INSTRUCTION = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:",  # noqa: E501
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.",  # noqa: E501
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",  # noqa: E501
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.",  # noqa: E501
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",  # noqa: E501
    "User Prompt: ",
)


def encode_sana(backbone: "Backbone", prompts: list[str], mask_encoder: bool) -> Cond:
    """As SanaPipeline.encode_prompt by default: prompts lower-cased and stripped, the
    instruction before each, Gemma's states under its mask padded on the right, and of
    the instructed sequence its first token and last max_length - 1."""
    backbone.text["tokenizer"].padding_side = "right"
    prompts = [p.lower().strip() for p in prompts]
    n = backbone.max_length
    instruction = "\n".join(SANA_INSTRUCTION)
    length = len(backbone.tokenizer.encode(instruction)) + n - 2
    ids, mask = _tokens(backbone, [instruction + p for p in prompts], max_length=length)
    keep = [0, *range(-n + 1, 0)]
    return Cond(backbone.text_encoder(ids, attention_mask=mask)[0][:, keep], mask[:, keep])


def empty_sana(backbone: "Backbone") -> Cond:
    """Sana's negative prompt: "" without the instruction, max_length tokens."""
    backbone.text["tokenizer"].padding_side = "right"
    ids, mask = _tokens(backbone, [""])
    return Cond(backbone.text_encoder(ids, attention_mask=mask)[0], mask)


def call_sana(backbone: "Backbone", net: nn.Module, x_t, t, cond: Cond) -> torch.Tensor:
    """Sana: Gemma's states under their mask; time scaled as SanaPipeline scales it; a
    learned variance, where the net has one, dropped."""
    out = net(x_t, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask,
              timestep=t * net.config.timestep_scale).sample
    return out[:, : backbone.channels]


def call_mmdit(backbone: "Backbone", net: nn.Module, x_t, t, cond: Cond) -> torch.Tensor:
    """SD3-class MMDiT: token states and the pooled embedding; time as sigma * 1000."""
    return net(hidden_states=x_t, encoder_hidden_states=cond.embeds, pooled_projections=cond.extra["pooled"],
               timestep=t).sample


# --- empty conditioning of a denoiser's shapes, on the meta device (wadi plan) -----------

def _meta(*shape, dtype) -> torch.Tensor:
    return torch.zeros(*shape, device="meta", dtype=dtype)


def meta_cond_unet(net: nn.Module, batch: int, tokens: int, dtype) -> Cond:
    """A UNet's cross-attention states."""
    return Cond(_meta(batch, tokens, net.config.cross_attention_dim, dtype=dtype))


def meta_cond_sdxl(net: nn.Module, batch: int, tokens: int, dtype) -> Cond:
    """SDXL's states, pooled embedding and six size micro-conditions."""
    c = net.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return Cond(_meta(batch, tokens, c.cross_attention_dim, dtype=dtype), None,
                {"text_embeds": _meta(batch, pooled, dtype=dtype), "time_ids": _meta(batch, 6, dtype=dtype)})


def meta_cond_mmdit(net: nn.Module, batch: int, tokens: int, dtype) -> Cond:
    """An SD3-class MMDiT's joint states and pooled embedding."""
    c = net.config
    return Cond(_meta(batch, tokens, c.joint_attention_dim, dtype=dtype), None,
                {"pooled": _meta(batch, c.pooled_projection_dim, dtype=dtype)})
