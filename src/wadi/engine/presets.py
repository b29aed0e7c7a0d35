"""The named presets: each expands into settings that `wadi.engine.config.resolve` completes and
checks. Ours are the paper's recipe per backbone and its ablations; the embedded worlds
register their own (wadi.worlds)."""

from __future__ import annotations

import copy


def deep_update(base: dict, new: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in new.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


_SD = {"train": {"mixed_precision": "fp16", "gradient_checkpointing": True, "adam_8bit": True}}
PRESETS: dict[str, dict] = {
    "sd15-wadi": deep_update(_SD, {"model": {"kind": "sd", "resolution": 512,
                                              "path": "stable-diffusion-v1-5/stable-diffusion-v1-5"}}),
    "sd21-wadi": deep_update(_SD, {"model": {"kind": "sd", "resolution": 512,
                                              "path": "stabilityai/stable-diffusion-2-1-base"}}),
    "pixart-wadi": {"model": {"kind": "pixart", "path": "PixArt-alpha/PixArt-XL-2-256x256", "resolution": 256},
                    "student": {"rank": 128},
                    "train": {"mixed_precision": "bf16", "gradient_checkpointing": True, "adam_8bit": True}},
    # SDXL at 1024 px: SD 1.5's recipe; r=128 is 10.3% of its 2567M-parameter UNet (wadi params);
    # 16 prompts per process as 2 x 8, which the computed budget fits in 24 GB (README, Memory).
    "sdxl-wadi": deep_update(_SD, {"model": {"kind": "sdxl", "resolution": 1024,
                                              "path": "stabilityai/stable-diffusion-xl-base-1.0"},
                                    "student": {"rank": 128}, "train": {"batch_size": 8, "grad_accum": 2}}),
    # The flow-matching transformers (docs/method.md, section 4): rank for about 10% of the
    # denoiser, as the paper's 83.8M of SD 1.5's 860M (wadi params: SD3.5 medium r=128 9.4%,
    # Sana 1.6B r=256 8.7% of its linear layers' share), bf16 as PixArt.
    "sd3-wadi": {"model": {"kind": "sd3", "path": "stabilityai/stable-diffusion-3.5-medium", "resolution": 1024},
                 "student": {"rank": 128},
                 "train": {"mixed_precision": "bf16", "gradient_checkpointing": True, "adam_8bit": True}},
    "sana-wadi": {"model": {"kind": "sana", "path": "Efficient-Large-Model/Sana_1600M_1024px_diffusers",
                            "resolution": 1024},
                  "train": {"mixed_precision": "bf16", "gradient_checkpointing": True, "adam_8bit": True}},
    # FLUX.1 [dev] at 1024 px (docs/backbones.md): r=256 is 9.1% of its 11.9B transformer (wadi
    # params), the paper's 10%; bf16 as the other transformers. Its guidance is an input that
    # teacher, fake model and student share (model.guidance, default the pipeline's 3.5), so
    # train.guidance stays 1; no empty-prompt rows for a fake that is never asked about them.
    "flux-wadi": {"model": {"kind": "flux", "path": "black-forest-labs/FLUX.1-dev", "resolution": 1024},
                  "student": {"rank": 256},
                  "train": {"mixed_precision": "bf16", "gradient_checkpointing": True, "adam_8bit": True,
                            "guidance": 1.0, "fake_uncond_prob": 0.0}},
    # Z-Image and FLUX.2 klein (docs/backbones.md): the undistilled bases as teachers (CFG against
    # the empty prompt), rank for about 10% of the denoiser as above (wadi params: Z-Image 6B
    # r=256 10.1%, klein 4B r=256 8.6%, klein 9B r=384 9.8%), bf16.
    "z-image-wadi": {"model": {"kind": "z-image", "path": "Tongyi-MAI/Z-Image", "resolution": 1024},
                     "student": {"rank": 256},
                     "train": {"mixed_precision": "bf16", "gradient_checkpointing": True, "adam_8bit": True}},
    "flux2-klein-4b-wadi": {"model": {"kind": "flux2-klein", "path": "black-forest-labs/FLUX.2-klein-base-4B",
                                      "resolution": 1024},
                            "student": {"rank": 256},
                            "train": {"mixed_precision": "bf16", "gradient_checkpointing": True, "adam_8bit": True}},
    "flux2-klein-9b-wadi": {"model": {"kind": "flux2-klein", "path": "black-forest-labs/FLUX.2-klein-base-9B",
                                      "resolution": 1024},
                            "student": {"rank": 384},
                            "train": {"mixed_precision": "bf16", "gradient_checkpointing": True, "adam_8bit": True}},
    # Qwen-Image (20B) at its pipeline's default 1024 px: r=128 (946M of 20430M, 4.6%; wadi
    # params), half the 10% rule's r=256, whose adapter states alone would take the frozen
    # parts' 58 GB past 77 GB (docs/backbones.md); 16 prompts per process as 2 x 8.
    "qwen-image-wadi": {"model": {"kind": "qwen-image", "path": "Qwen/Qwen-Image", "resolution": 1024},
                        "student": {"rank": 128},
                        "train": {"mixed_precision": "bf16", "gradient_checkpointing": True, "adam_8bit": True,
                                  "batch_size": 2, "grad_accum": 8}},
}
# The paper's rank ablation (student r) and adapter ablation (same targets, matched budget).
for _r in (64, 128, 512):
    PRESETS[f"sd15-wadi-r{_r}"] = deep_update(PRESETS["sd15-wadi"], {"student": {"rank": _r}})
for _kind in ("lorad", "lora", "dora", "dora-frozen", "full"):
    PRESETS[f"sd15-ablation-{_kind}"] = deep_update(PRESETS["sd15-wadi"],
                                                     {"student": {"kind": _kind}, "train": {"steps": 10000}})


def preset_names() -> list[str]:
    from wadi.worlds import world_presets

    return list(PRESETS) + list(world_presets())


def preset_values(name: str) -> dict | None:
    """A preset's settings: ours, or one an embedded world registers; None if unknown."""
    if name in PRESETS:
        return copy.deepcopy(PRESETS[name])
    from wadi.worlds import world_presets

    make = world_presets().get(name)
    return make() if make else None
