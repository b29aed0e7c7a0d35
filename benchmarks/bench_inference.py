"""Inference benchmark: what one-step distillation buys, and what merging LoRaD costs.

1. Time to an image (batch 1: text encoding, denoising, VAE decode) for the merged
   one-step student (`wadi.models.sampling.sample_student`) against its teacher at 25 DDIM steps with
   classifier-free guidance 3 (`wadi.models.sampling.sample_teacher`, the paper's setting: 50 UNet
   evaluations). Student and teacher are the same architecture and size.
2. One UNet forward of the merged student against the unadapted base model: after
   `merged_model()` the student is a plain UNet2DConditionModel with rotated weights,
   so the two must take the same time (up to noise).

Models are SD-shaped with random weights (timing does not depend on the values), built
in memory: `--size cpu` (default) is a small UNet (12.8M parameters) at a 16 x 16
latent (128 px) that a CPU runs in seconds; `--size sd15` has the shapes of Stable Diffusion 1.5 (860M UNet,
CLIP ViT-L text encoder, 512 px), for a GPU. The student is the base UNet with a LoRaD
adapter (student targets, random non-zero angles) merged.

Timing: a warm-up call of each, then `--rounds` rounds; each round runs every contender
once, alternating which goes first, so a slow spell of a shared machine hits both. Medians
and minima (other processes only ever add time) are reported.

    python benchmarks/bench_inference.py [--size cpu|sd15] [--rounds 3] [--forward-rounds 20]
                                         [--device cpu] [--dtype fp32] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import char_tokenizer

from wadi.adapters.core import AdapterConfig, attach
from wadi.models.backbones import DTYPES, Backbone, BackboneSpec
from wadi.models.sampling import sample_student, sample_teacher

SIZES = {
    "cpu": dict(
        unet=dict(sample_size=16, block_out_channels=(64, 128, 256), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32),
        text=dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=4),
        vae=dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=16),
        rank=64),
    "sd15": dict(  # Stable Diffusion 1.5's shapes (diffusers' defaults are SD 1.5's UNet)
        unet=dict(sample_size=64, cross_attention_dim=768),
        text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
        rank=256),
}
PROMPT = "a photo of a cat sitting on a windowsill"


def build_backbone(size: dict, folder: Path) -> Backbone:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**size["unet"]).eval()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=54, max_position_embeddings=77, **size["text"])).eval()
    vae = AutoencoderKL(latent_channels=4, down_block_types=("DownEncoderBlock2D",) * len(size["vae"]["block_out_channels"]),
                        up_block_types=("UpDecoderBlock2D",) * len(size["vae"]["block_out_channels"]),
                        **size["vae"]).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False)
    for m in (unet, text, vae):
        m.requires_grad_(False)
    return Backbone(BackboneSpec(kind="sd"), unet, text, char_tokenizer(folder), dict(scheduler.config), vae=vae)


def merged_student(base: torch.nn.Module, rank: int) -> torch.nn.Module:
    """The base UNet with a LoRaD student adapter at non-zero angles, merged into a plain UNet."""
    adapter = attach(copy.deepcopy(base), AdapterConfig("lorad", rank, "unet-student"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in adapter.trainable_parameters().items():
            if name.endswith("theta_a"):  # zeros at init: the identity rotation
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    student = adapter.merged_model().eval()
    assert type(student) is type(base) and student.state_dict().keys() == base.state_dict().keys()
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in base.parameters())
    return student


def timer(device: torch.device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    return run


def interleaved(contenders: dict, rounds: int, run) -> dict[str, list[float]]:
    """Every contender once per round, the order alternating; one warm-up call each first."""
    for fn in contenders.values():
        run(fn)
    names, times = list(contenders), {n: [] for n in contenders}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            times[n].append(run(contenders[n]))
    return times


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "rounds": len(times)}


def load_average() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=SIZES, default="cpu")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of time to an image")
    ap.add_argument("--forward-rounds", type=int, default=20, help="rounds of the single forward")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=DTYPES, default="fp32")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared CPU, OpenMP threads stall each other)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype, size = torch.device(args.device), DTYPES[args.dtype], SIZES[args.size]
    load_before = load_average()

    with tempfile.TemporaryDirectory() as tmp:
        bb = build_backbone(size, Path(tmp))
    student = merged_student(bb.net, size["rank"]).to(device, dtype)
    bb.to(device, dtype)
    run = timer(device)
    with torch.inference_mode():
        image = interleaved({
            "student, 1 step": lambda: sample_student(bb, student, [PROMPT], [0]),
            f"teacher, {args.steps} steps, cfg {args.guidance:g}": lambda: sample_teacher(
                bb, bb.net, [PROMPT], [0], steps=args.steps, guidance=args.guidance, scheduler="ddim"),
        }, args.rounds, run)
        c = bb.encode_prompts([PROMPT]).to(device, dtype)
        x = torch.randn((1, *bb.latent_shape), generator=torch.Generator().manual_seed(0)).to(device, dtype)
        t = torch.tensor([999], device=device)
        forward = interleaved({
            "base UNet": lambda: bb.net(x, t, encoder_hidden_states=c.embeds),
            "merged student UNet": lambda: student(x, t, encoder_hidden_states=c.embeds),
        }, args.forward_rounds, run)

    params = sum(p.numel() for p in bb.net.parameters())
    result = {
        "machine": {"device": str(device), "cpu": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": args.threads, "dtype": args.dtype,
                    "load_average_before": load_before, "load_average_after": load_average(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "size": args.size, "unet_parameters": params, "image_px": bb.latent_size * 2 ** (len(size["vae"]["block_out_channels"]) - 1),
        "time_to_image": {k: summary(v) for k, v in image.items()},
        "forward": {k: summary(v) for k, v in forward.items()},
    }
    (s_name, s), (t_name, te) = result["time_to_image"].items()
    (b_name, b), (m_name, m) = result["forward"].items()
    result["speedup_median"] = te["median_s"] / s["median_s"]
    result["merged_over_base_median"] = m["median_s"] / b["median_s"]
    print(f"{args.size}: UNet {params / 1e6:.1f}M parameters, {result['image_px']} px, {device} {args.dtype}, "
          f"{args.threads} threads, load {load_before} -> {result['machine']['load_average_after']}")
    print("| time to an image (batch 1) | median s | min s |\n|---|---|---|")
    for name, r in result["time_to_image"].items():
        print(f"| {name} | {r['median_s']:.3f} | {r['min_s']:.3f} |")
    print(f"speed-up (median): {result['speedup_median']:.1f}x")
    print("| one UNet forward (batch 1) | median ms | min ms |\n|---|---|---|")
    for name, r in result["forward"].items():
        print(f"| {name} | {1e3 * r['median_s']:.2f} | {1e3 * r['min_s']:.2f} |")
    print(f"merged / base (median): {result['merged_over_base_median']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
