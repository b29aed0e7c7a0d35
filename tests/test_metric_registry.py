"""The metrics users compare distillations by, each against a computation written out here
(KID against the double sum of its formula, FD-DINOv2 against the Frechet code on the
model's own outputs, ImageReward against transformers' image-text matching forward, ...),
on tiny random scorer models saved and loaded by path: nothing is downloaded."""

import json
import string

import numpy as np
import pytest
import torch
from PIL import Image

import wadi.evaluation.metrics
import wadi.evaluation.metrics.inception
from wadi.cli import main
from wadi.evaluation.evaluate import image_path
from wadi.evaluation.metrics import frechet_distance_features, list_images, to_rgb_uint8
from wadi.evaluation.metrics.diversity import seed_diversity
from wadi.evaluation.metrics.kid import kernel_distance, mmd2_unbiased
from wadi.evaluation.metrics.registry import METRICS, result_keys


def kid_by_loops(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, pair by pair."""
    d, m = x.shape[1], len(x)
    k = lambda a, b: (float(a @ b) / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_mmd_of_its_formula():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.5, 1.2, size=(12, 5))
    assert mmd2_unbiased(x, y) == pytest.approx(kid_by_loops(x, y), rel=1e-12)
    # One subset as large as both sets: a permutation of each, so the full-set value.
    k = kernel_distance(x, y, subsets=1, subset_size=100)
    assert k.subset_size == 12 and k.mean == pytest.approx(kid_by_loops(x, y), rel=1e-12) and k.std == 0


def test_kid_mean_and_spread_over_subsets():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(30, 4)), rng.normal(0.3, 1.0, size=(25, 4))
    k = kernel_distance(real, fake, subsets=7, subset_size=10, seed=3)
    draws = np.random.default_rng(3)  # the same draws, real then fake in each subset
    values = [kid_by_loops(real[draws.choice(30, 10, replace=False)], fake[draws.choice(25, 10, replace=False)])
              for _ in range(7)]
    assert (k.mean, k.std) == pytest.approx((np.mean(values), np.std(values)), rel=1e-10)


def test_kid_of_one_distribution_is_near_zero_and_of_two_is_not():
    """Unbiased: two samples of one distribution average 0, far below a shifted one."""
    rng = np.random.default_rng(2)
    same = [kernel_distance(rng.normal(size=(200, 8)), rng.normal(size=(200, 8)), subsets=5).mean for _ in range(20)]
    shifted = kernel_distance(rng.normal(size=(200, 8)), rng.normal(0.5, 1, size=(200, 8)), subsets=5).mean
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(20) + 1e-3 and shifted > 10 * np.std(same)


def test_kid_refuses_sets_too_small_or_of_other_widths():
    with pytest.raises(ValueError, match="at least 2"):
        kernel_distance(np.ones((1, 3)), np.ones((5, 3)))
    with pytest.raises(ValueError, match="equal d"):
        kernel_distance(np.ones((4, 3)), np.ones((4, 2)))


def test_diversity_is_the_mean_pairwise_cosine_distance_per_prompt():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(7, 4))
    prompts = ["a", "b", "a", "c", "a", "b", "d"]  # c and d have one image: left out
    expected = []
    for group in ([0, 2, 4], [1, 5]):
        pairs = [(i, j) for i in group for j in group if i < j]
        expected.append(np.mean([1 - feats[i] @ feats[j] / np.linalg.norm(feats[i]) / np.linalg.norm(feats[j])
                                 for i, j in pairs]))
    assert seed_diversity(feats, prompts) == pytest.approx(np.mean(expected), rel=1e-12)
    assert seed_diversity(np.ones((4, 3)), ["a"] * 4) == pytest.approx(0, abs=1e-12)
    with pytest.raises(ValueError, match="--repeats"):
        seed_diversity(feats[:2], ["a", "b"])


def test_every_metric_has_keys_and_a_protocol():
    keys = [k for m in METRICS.values() for k in m.keys]
    assert len(keys) == len(set(keys)) and set(result_keys()) <= set(keys)
    assert {"fid", "kid", "fid_teacher", "fd_dinov2", "diversity", "clip", "pickscore", "hpsv2",
            "imagereward"} <= set(METRICS)


# --- tiny scorer models -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_dinov2")
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                             image_size=224, patch_size=14)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_image_reward(tmp_path_factory):
    """A random BLIP retrieval model and processor, and a reward head built from its
    image-text matching head so that the reward is the ITM logit difference, standardised."""
    from safetensors.torch import save_file
    from transformers import (BertTokenizer, BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor,
                              BlipProcessor)

    path = tmp_path_factory.mktemp("tiny_image_reward")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase]
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(path / "vocab.txt"))
    config = BlipConfig(text_config=dict(vocab_size=len(words), hidden_size=16, encoder_hidden_size=16,
                                         intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         max_position_embeddings=40),
                        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=8)
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(config).eval()
    model.save_pretrained(path)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(path)
    w, b = model.itm_head.weight.detach(), model.itm_head.bias.detach()
    widths = [16, 6, 5, 4, 3, 1]  # hidden -> ... -> 1, as ImageReward's 768 -> 1024 -> 128 -> 64 -> 16 -> 1
    head = {}
    for n, (name, (i, o)) in enumerate(zip(("layers.0", "layers.2", "layers.4", "layers.6", "layers.7"),
                                          zip(widths, widths[1:]))):
        weight, bias = torch.zeros(o, i), torch.zeros(o)
        if n == 0:
            weight[0], bias[0] = w[1] - w[0], b[1] - b[0]
        else:
            weight[0, 0] = 1
        head[f"{name}.weight"], head[f"{name}.bias"] = weight.contiguous(), bias
    save_file(head, str(path / "reward_head.safetensors"), metadata={"mean": "0.25", "std": "2.0"})
    return path


def pixel_features(images, *args, **kwargs):
    """A cheap stand-in for the Inception: the 8 x 8 grey thumbnail as 64 numbers."""
    thumbs = [Image.fromarray(to_rgb_uint8(im)).convert("L").resize((8, 8), Image.BILINEAR) for im in images]
    return np.stack([np.asarray(t, dtype=np.float32).ravel() for t in thumbs])


@torch.no_grad()
def dinov2_direct(folder, paths):
    """The class token after the final norm, on inputs resized and normalised here."""
    from transformers import Dinov2Model

    from wadi.evaluation.metrics.inception import clean_resize

    model = Dinov2Model.from_pretrained(folder).eval()
    x = np.stack([(clean_resize(to_rgb_uint8(p), 224) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
                  for p in paths])
    out = model(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2).float())
    return out.last_hidden_state[:, 0].double().numpy()  # pooler_output is this token's


@torch.no_grad()
def clip_direct(folder, paths, prompts):
    """(cos, exp(logit scale)) straight from transformers' CLIP."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    inputs = processor(text=prompts, images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt",
                       padding=True, truncation=True, max_length=16)
    out = model(**inputs)
    image, text = out.image_embeds, out.text_embeds
    cos = (image / image.norm(dim=-1, keepdim=True) * text / text.norm(dim=-1, keepdim=True)).sum(-1)
    return cos.numpy(), float(model.logit_scale.exp())


@torch.no_grad()
def image_reward_direct(folder, paths, prompts):
    """transformers' own image-text matching forward: the reward head above makes the reward
    (logit 1 - logit 0 - 0.25) / 2."""
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    model, processor = BlipForImageTextRetrieval.from_pretrained(folder).eval(), BlipProcessor.from_pretrained(folder)
    pixels = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt").pixel_values
    text = processor.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    logits = model(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=pixels,
                   use_itm_head=True).itm_score
    return ((logits[:, 1] - logits[:, 0] - 0.25) / 2).numpy()


def test_eval_reports_every_metric_each_as_computed_directly(tiny_run, tmp_path, tiny_clip, tiny_dinov2,
                                                             tiny_image_reward, monkeypatch):
    monkeypatch.setattr(wadi.evaluation.metrics, "extract_features", pixel_features)
    monkeypatch.setattr(wadi.evaluation.metrics.inception, "extract_features", pixel_features)
    run = tiny_run("sd")[1]
    reference = tmp_path / "ref"
    reference.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(reference / f"{i}.png")
    (tmp_path / "p.txt").write_text("a cat\na red car\na dog\nthe table\n")
    out = tmp_path / "out"
    names = "fid,kid,pr,fid_teacher,fd_dinov2,diversity,clip,pickscore,hpsv2,imagereward"
    assert main(["eval", str(run), "--teacher", "--teacher-steps", "2", "--prompts", str(tmp_path / "p.txt"),
                 "--repeats", "2", "--ref", str(reference), "--ref-cache", str(tmp_path / "cache"),
                 "--metrics", names, "--pr-k", "2", "--kid-subsets", "1", "--clip-model", str(tiny_clip),
                 "--dinov2-model", str(tiny_dinov2), "--pickscore-model", str(tiny_clip), "--hps-model",
                 str(tiny_clip), "--imagereward-model", str(tiny_image_reward), "--out", str(out),
                 "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    protocols = results["settings"]["metrics"]["protocols"]
    assert list(protocols) == names.split(",") and protocols["kid"]["subsets"] == 1
    assert protocols["fd_dinov2"]["model"] == str(tiny_dinov2) and protocols["diversity"]["repeats"] == 2
    prompts = [p for p in ["a cat", "a red car", "a dog", "the table"] for _ in range(2)]
    assert [json.loads(line)["prompt"] for line in (out / "prompts.jsonl").read_text().splitlines()] == prompts
    ref_paths = list_images(reference)
    real, real_dino = pixel_features(ref_paths), dinov2_direct(tiny_dinov2, ref_paths)
    teacher_paths = [image_path(out / "teacher", i) for i in range(8)]
    for name, r in results["models"].items():
        paths = [image_path(out / name, i) for i in range(8)]
        feats, dino = pixel_features(paths), dinov2_direct(tiny_dinov2, paths)
        assert r["fid"] == pytest.approx(frechet_distance_features(feats, real), rel=1e-6)
        # 8 images against 8: the one subset holds both sets whole.
        assert r["kid_subset_size"] == 8 and r["kid"] == pytest.approx(kid_by_loops(real.astype(np.float64),
                                                                                    feats.astype(np.float64)), rel=1e-9)
        if name == "teacher":
            assert "fid_teacher" not in r
        else:
            teacher = pixel_features(teacher_paths)
            assert r["fid_teacher"] == pytest.approx(frechet_distance_features(feats, teacher), rel=1e-6)
        assert r["fd_dinov2"] == pytest.approx(frechet_distance_features(dino, real_dino), rel=1e-5)
        assert r["diversity"] == pytest.approx(seed_diversity(dino, prompts), rel=1e-5, abs=1e-9)
        cos, scale = clip_direct(tiny_clip, paths, prompts)
        assert r["clip_score"] == pytest.approx(float(cos.clip(min=0).mean()), abs=1e-6)
        assert r["hpsv2"] == pytest.approx(float(cos.mean()), abs=1e-6)
        assert r["pickscore"] == pytest.approx(scale * float(cos.mean()), abs=1e-4)
        assert r["imagereward"] == pytest.approx(float(image_reward_direct(tiny_image_reward, paths, prompts).mean()),
                                                 abs=1e-5)


def test_metrics_needing_the_teacher_or_repeats_or_a_model_refuse_early(tiny_run, tmp_path, capsys):
    run = str(tiny_run("sd")[1])
    capsys.readouterr()  # what making the tiny run printed
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    base = ["eval", run, "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(base + ["--metrics", "fid_teacher", "--features", "test_metric_registry:pixel_features"]) == 2
    assert main(base + ["--metrics", "diversity", "--dinov2-model", str(tmp_path)]) == 2
    assert main(base + ["--metrics", "pickscore"]) == 2
    assert main(base + ["--metrics", "kid"]) == 2
    assert main(base + ["--metrics", "fid_teacher", "--features", "test_metric_registry:pixel_features",
                        "--kid-subsets", "0"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 5
    assert "--teacher" in errors[0] and "cannot load the diversity model" in errors[1]
    assert "--pickscore-model" in errors[2] and "kid need reference images" in errors[3]
    assert "--kid-subsets must be at least 1" in errors[4]
    assert not (tmp_path / "o").exists()


def test_dmd2_protocol_resizes_and_prefixes_the_clip_prompts(tiny_run, tmp_path, tiny_clip):
    """--protocol dmd2-coco10k: prompts in file order, every image's centre square resized to
    256 with Lanczos before the metric, "A photo depicts " before each caption for CLIP."""
    from transformers import CLIPModel, CLIPProcessor

    run = str(tiny_run("sd")[1])
    (tmp_path / "captions.txt").write_text("a cat\na red car\na dog\n")
    out = tmp_path / "out"
    assert main(["eval", run, "--protocol", "dmd2-coco10k", "--prompts", str(tmp_path / "captions.txt"), "--num", "2",
                 "--metrics", "clip", "--clip-model", str(tiny_clip), "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["prompts"]["n"] == 2
    protocol = results["settings"]["metrics"]["protocols"]["clip"]
    assert protocol["prompt_prefix"] == "A photo depicts " and protocol["resize"] == 256
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    images = [Image.open(image_path(out / "student", i)).convert("RGB") for i in range(2)]
    images = [im.resize((256, 256), Image.LANCZOS) for im in images]  # square already: the crop keeps it whole
    with torch.no_grad():
        o = model(**processor(text=["A photo depicts a cat", "A photo depicts a red car"], images=images,
                              return_tensors="pt", padding=True, truncation=True, max_length=16))
    cos = torch.nn.functional.cosine_similarity(o.image_embeds, o.text_embeds).clamp(min=0)
    assert results["models"]["student"]["clip_score"] == pytest.approx(float(cos.mean()), abs=1e-6)
    assert main(["eval", run, "--protocol", "coco2014-30k", "--prompts", str(tmp_path / "captions.txt"),
                 "--out", str(tmp_path / "o2"), "--metrics", "clip", "--clip-model", str(tiny_clip)]) == 2


def test_model_card_lists_every_registry_score_beside_the_run(tiny_run, tmp_path):
    """model_card.run_settings lists every score of the run's eval/results.json (the registry wrote them)."""
    import shutil

    from wadi.artifacts.model_card import run_settings

    run = tmp_path / "run"
    shutil.copytree(tiny_run("sd")[1], run)
    (run / "eval").mkdir(exist_ok=True)
    scores = {"fid": 12.5, "kid": 0.0123, "kid_std": 0.001, "kid_subset_size": 8, "hpsv2": 0.271,
              "imagereward": -0.5, "precision": 0.5}
    (run / "eval" / "results.json").write_text(json.dumps({"models": {"student": {**scores, "num_images": 8}}}))
    _, metrics = run_settings(str(run))
    assert metrics == ["student: fid 12.5, kid 0.0123, kid_std 0.001, kid_subset_size 8, hpsv2 0.271, "
                       "imagereward -0.5, precision 0.5 (8 images)"]


def test_scorer_folders_missing_a_part_refuse_before_any_image(tiny_run, tiny_clip, tmp_path, capsys):
    """An ImageReward folder without its reward head, a PickScore processor that does not load."""
    run = str(tiny_run("sd")[1])
    capsys.readouterr()
    (tmp_path / "p.txt").write_text("a cat\n")
    base = ["eval", run, "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(base + ["--metrics", "imagereward", "--imagereward-model", str(tiny_clip)]) == 2
    assert main(base + ["--metrics", "pickscore", "--pickscore-model", str(tiny_clip), "--pickscore-processor",
                        str(tmp_path)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "reward_head.safetensors" in errors[0] and "PickScore processor" in errors[1]
    assert not (tmp_path / "o").exists()


def open_clip_names(hf: dict) -> dict:
    """transformers' CLIP weights under OpenCLIP's names, written out from OpenCLIP's model code:
    q/k/v stacked as `in_proj`, the output projections as (width, embed) matrices."""
    out = {"visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
           "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
           "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
           "visual.proj": hf["visual_projection.weight"].t(), "text_projection": hf["text_projection.weight"].t(),
           "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
           "logit_scale": hf["logit_scale"], "attn_mask": torch.zeros(16, 16)}
    for leaf in ("weight", "bias"):
        out[f"visual.ln_pre.{leaf}"] = hf[f"vision_model.pre_layrnorm.{leaf}"]
        out[f"visual.ln_post.{leaf}"] = hf[f"vision_model.post_layernorm.{leaf}"]
        out[f"ln_final.{leaf}"] = hf[f"text_model.final_layer_norm.{leaf}"]
        for ours, tower in (("visual.transformer", "vision_model"), ("transformer", "text_model")):
            theirs = f"{tower}.encoder.layers.0"
            out[f"{ours}.resblocks.0.attn.in_proj_{leaf}"] = torch.cat(
                [hf[f"{theirs}.self_attn.{p}_proj.{leaf}"] for p in "qkv"])
            for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{ours}.resblocks.0.{a}.{leaf}"] = hf[f"{theirs}.{b}.{leaf}"]
    return out


def test_open_clip_checkpoint_becomes_the_same_transformers_clip(tiny_clip, tmp_path):
    """HPSv2's weights come as an OpenCLIP state dict: converted, they give the model back."""
    from transformers import CLIPModel

    from wadi.evaluation.metrics.open_clip_layout import clip_state_dict, save_clip_folder

    model = CLIPModel.from_pretrained(tiny_clip).eval()
    hf = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    torch.save({"state_dict": {f"module.{k}": v for k, v in open_clip_names(hf).items()}}, tmp_path / "hps.pt")
    assert clip_state_dict(open_clip_names(hf)).keys() == hf.keys()
    save_clip_folder(tmp_path / "hps.pt", tmp_path / "hps", tiny_clip)
    back = CLIPModel.from_pretrained(tmp_path / "hps").state_dict()
    assert all(torch.equal(back[k], v) for k, v in hf.items())
    with pytest.raises(ValueError, match="not an OpenCLIP CLIP weight: visual.extra"):
        clip_state_dict({"visual.extra": torch.zeros(1)})


def test_image_reward_checkpoint_becomes_the_same_scorer(tiny_image_reward, tmp_path):
    """The released ImageReward.pt's names (LAVIS' BLIP under `blip.`, the MLP under `mlp.`),
    written out here from the tiny folder's weights, give the same rewards once converted."""
    from safetensors.torch import load_file
    from transformers import BlipForImageTextRetrieval

    from wadi.evaluation.metrics.image_reward import MEAN, STD, ImageReward, save_folder

    hf = BlipForImageTextRetrieval.from_pretrained(tiny_image_reward).state_dict()
    released = {f"blip.text_encoder.{k.removeprefix('text_encoder.')}": v for k, v in hf.items()
                if k.startswith("text_encoder.")}
    vision = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
              "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
              "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
              "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
    for ours, theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.qkv", "self_attn.qkv"),
                         ("attn.proj", "self_attn.projection"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
        for leaf in ("weight", "bias"):
            vision[f"blocks.0.{ours}.{leaf}"] = f"encoder.layers.0.{theirs}.{leaf}"
    released.update({f"blip.visual_encoder.{k}": hf[f"vision_model.{v}"] for k, v in vision.items()})
    released["blip.vision_proj.weight"] = hf["vision_proj.weight"]  # not part of the reward
    head = load_file(tiny_image_reward / "reward_head.safetensors")
    released.update({f"mlp.{k}": v for k, v in head.items()})
    torch.save(released, tmp_path / "ImageReward.pt")
    save_folder(tmp_path / "ImageReward.pt", tmp_path / "ir", tiny_image_reward, image_size=32)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    prompts = ["a cat", "a dog", "a red car"]
    ours = ImageReward(tmp_path / "ir").rewards(images, prompts)
    original = ImageReward(tiny_image_reward).rewards(images, prompts)
    # The released standardisation replaces the tiny head's own mean 0.25 and deviation 2.
    np.testing.assert_allclose(ours * STD + MEAN, original * 2 + 0.25, rtol=1e-5, atol=1e-6)
    torch.save({"blip.visual_encoder.extra.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not an ImageReward BLIP weight"):
        save_folder(tmp_path / "bad.pt", tmp_path / "bad", tiny_image_reward)
