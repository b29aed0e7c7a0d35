"""Tiny diffusers backbones built in code: the shapes of the real ones, a few thousand weights."""

import os

# Tiny models run fastest on one thread, and several threads per process thrash a shared
# 2-core machine (measured: a tiny distillation step took 0.3 s on one thread, 4.3 s on two
# under load): one unless OMP_NUM_THREADS says otherwise (the suite passes with 1 and 2).
# Subprocesses started by tests inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# MKL may pick kernels by memory alignment, so two processes doing the same sums can
# differ in the last bits; strict mode makes a resumed run's sums those of an unbroken one.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import string  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
    attention_head_dim=8, norm_num_groups=16,
)
TINY_PIXART = dict(
    sample_size=8, num_layers=2, num_attention_heads=2, attention_head_dim=8, in_channels=4,
    out_channels=8, patch_size=2, cross_attention_dim=16, caption_channels=32,
    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    num_embeds_ada_norm=1000, activation_fn="gelu-approximate", attention_bias=True,
    use_additional_conditions=False,
)


def tiny_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY_UNET, **overrides}).eval()


def tiny_pixart(seed: int = 0) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(**TINY_PIXART).eval()


def unet_inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10, 500][:batch]),
            torch.randn(batch, 5, 32, generator=g))


def pixart_inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g),
                timestep=torch.tensor([10, 500][:batch]),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def assert_close_ulps(actual, expected, ulps: int = 8, what: str = "") -> None:
    """`actual` equals `expected` up to `ulps` units in the last place of the largest
    magnitude in `expected` (torch.finfo of its dtype): what float rounding can change when
    the same result is computed through another path (another batch shape, a cached
    encoding, another CPU's kernels), and nothing a wrong result would hide in. Comparisons
    of one computation run twice stay bit-exact (tests/README.md lists them)."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, \
        f"{what}: {actual.dtype}{list(actual.shape)} against {expected.dtype}{list(expected.shape)}"
    magnitude = expected.double().abs().max().item() if expected.numel() else 0.0
    tolerance = ulps * torch.finfo(expected.dtype).eps * magnitude
    off = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    assert off <= tolerance, f"{what} differ by {off:.3g}, more than {ulps} ulps of {magnitude:.3g} ({tolerance:.3g})"


@pytest.fixture
def unet():
    return tiny_unet()


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A random CLIP a few thousand weights large, saved with its processor: no downloads."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    letters = string.ascii_lowercase
    vocab = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[])
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """kind -> (base pipeline folder, finished one-step run folder), made once per session
    and shared by the sample / export / eval / downstream tests (a training step moves
    the student off its teacher)."""
    import tiny_pipes

    from wadi.engine.training import distill

    savers = {"sd": tiny_pipes.save_tiny_sd, "pixart": tiny_pipes.save_tiny_pixart, "pixel": tiny_pipes.save_tiny_pixel,
              "sd3": tiny_pipes.save_tiny_sd3, "sana": tiny_pipes.save_tiny_sana, "sdxl": tiny_pipes.save_tiny_sdxl}
    made: dict[str, tuple[Path, Path]] = {}

    def get(kind: str) -> tuple[Path, Path]:
        if kind not in made:
            root = tmp_path_factory.mktemp(f"run-{kind}")
            (root / "prompts.txt").write_text("a cat\na red car\n")
            pipes = {kind: savers[kind](root / kind), "prompts": root / "prompts.txt"}
            cfg = tiny_pipes.make_cfg(pipes, root, kind=kind, steps=2)  # step 1 is zero: the fake starts as the teacher
            cfg.run.checkpoint_every = 0
            made[kind] = (pipes[kind], distill(cfg, progress=False))
        return made[kind]

    return get
