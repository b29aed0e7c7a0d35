"""Where diffusion users already work: LoRA files for diffusers' load_lora_weights and for
kohya-based UIs, adapter files of the LoRA kinds, model cards, the hub, trackers."""

import json

import pytest
import tiny_pipes
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from wadi.cli import main
from wadi.engine.training import distill


def unet_out(unet):
    g = torch.Generator().manual_seed(3)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([999, 400]), encoder_hidden_states=c).sample


def pipe(base):
    """The stock pipeline of a tiny base folder (saved as components, without model_index.json)."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(base, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(base, subfolder="unet"),
        scheduler=DDPMScheduler.from_pretrained(base, subfolder="scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def lorad_run(tmp_path_factory):
    """A tiny SD student moved well off its teacher (a large learning rate)."""
    root = tmp_path_factory.mktemp("eco")
    (root / "prompts.txt").write_text("a cat\na red car\n")
    pipes = {"sd": tiny_pipes.save_tiny_sd(root / "sd"), "prompts": root / "prompts.txt"}
    cfg = tiny_pipes.make_cfg(pipes, root, steps=3, lr_student=3e-2)
    cfg.run.checkpoint_every = 0
    run = distill(cfg, progress=False)
    return pipes["sd"], run, UNet2DConditionModel.from_pretrained(run / "student")


@pytest.mark.parametrize("fmt, file", [("lora", "pytorch_lora_weights.safetensors"), ("lora-kohya",
                                                                                   "lora_kohya.safetensors")])
def test_lora_export_at_full_rank_is_the_student(lorad_run, tmp_path, capsys, fmt, file):
    base, run, student = lorad_run
    assert main(["export", str(run), "--format", fmt, "--rank", "64", "--out", str(tmp_path / "lora")]) == 0
    report = json.loads((tmp_path / "lora" / "lora_report.json").read_text())
    assert report["energy_min"] > 1 - 1e-9 and report["layers"] > 0 and not report["left_out"]
    p = pipe(base)
    before = unet_out(p.unet)
    p.load_lora_weights(tmp_path / "lora" / file)  # kohya's layout goes through diffusers' own conversion
    torch.testing.assert_close(unet_out(p.unet), unet_out(student), rtol=0, atol=2e-5)
    assert (unet_out(student) - before).abs().max() > 1e-2  # the student is not its base
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "base_model" not in card or str(base) not in card.split("---")[1]  # a local base is no hub id
    assert "load_lora_weights" in card or "A1111" in card


def test_lora_export_at_a_lower_rank_reports_what_it_loses(lorad_run, tmp_path):
    base, run, student = lorad_run
    assert main(["export", str(run), "--format", "lora", "--rank", "1", "--out", str(tmp_path / "r1")]) == 0
    report = json.loads((tmp_path / "r1" / "lora_report.json").read_text())
    assert report["rank"] == 1 and report["energy_min"] < 1
    p = pipe(base)
    p.load_lora_weights(tmp_path / "r1")
    err = (unet_out(p.unet) - unet_out(student)).abs().max()
    assert 0 < err < (unet_out(pipe(base).unet) - unet_out(student)).abs().max()  # part of the way


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapter_files_of_the_lora_kinds_load_in_diffusers(tmp_path, kind):
    (tmp_path / "prompts.txt").write_text("a cat\na red car\n")
    pipes = {"sd": tiny_pipes.save_tiny_sd(tmp_path / "sd"), "prompts": tmp_path / "prompts.txt"}
    cfg = tiny_pipes.make_cfg(pipes, tmp_path, student=kind, steps=2)
    cfg.run.checkpoint_every = 0
    run = distill(cfg, progress=False)
    p = pipe(pipes["sd"])
    p.load_lora_weights(run / "student.safetensors")
    torch.testing.assert_close(unet_out(p.unet), unet_out(UNet2DConditionModel.from_pretrained(run / "student")),
                               rtol=0, atol=2e-5)


def test_every_export_carries_a_model_card(lorad_run, tmp_path):
    base, run, _ = lorad_run
    for fmt in ("pipeline", "adapter"):
        assert main(["export", str(run), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
        card = (tmp_path / fmt / "README.md").read_text()
        assert card.startswith("---") and "license:" in card and "2603.08258" in card
        assert str(base) in card and "guidance" in card  # the run's settings
    assert "num_inference_steps=1" in (tmp_path / "pipeline" / "README.md").read_text()


def test_hub_references_resolve_through_the_cache(lorad_run, tmp_path, monkeypatch):
    """`hub:OWNER/REPO/FILE` through huggingface_hub, against a cache laid out as it lays
    one out (refs/main -> snapshots/COMMIT/FILE), offline."""
    import huggingface_hub.constants as hc

    from wadi.files.hub import resolve

    base, run, student = lorad_run
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--authors--wadi-sd15"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(snapshot / "rotated_unet.safetensors"))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    assert resolve("hub:authors/wadi-sd15/rotated_unet.safetensors") == str(snapshot / "rotated_unet.safetensors")
    out = tmp_path / "s"
    assert main(["sample", "hub:authors/wadi-sd15/rotated_unet.safetensors", "--base", str(base), "--resolution",
                 "16", "--prompt", "a cat", "--out", str(out)]) == 0
    assert main(["sample", "hub:authors/wadi-sd15/missing.safetensors", "--base", str(base), "--prompt", "a cat",
                 "--out", str(tmp_path / "t")]) == 2
    with pytest.raises(ValueError, match="hub:OWNER/REPO/PATH"):
        resolve("hub:authors/wadi-sd15")


def test_push_to_hub_uploads_the_export_with_its_card(lorad_run, tmp_path, monkeypatch):
    """The hub mocked at the HTTP boundary: every request huggingface_hub makes is answered
    here, and the uploaded files are read back from the commit it sends."""
    import base64

    import huggingface_hub
    httpx = pytest.importorskip("httpx2")  # the HTTP client huggingface_hub 2 uses

    base, run, _ = lorad_run
    uploaded, calls = {}, []

    def hub(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        calls.append(f"{request.method} {path}")
        if path == "/api/repos/create":
            return httpx.Response(200, json={"url": "https://huggingface.co/me/student", "name": "me/student"})
        if path.endswith("/preupload/main"):
            files = json.loads(request.content)["files"]
            return httpx.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
        if "/commit/main" in path:
            for line in request.content.decode().splitlines():
                item = json.loads(line)
                if item.get("key") == "file":
                    uploaded[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return httpx.Response(200, json={"commitUrl": "https://huggingface.co/me/student/commit/abc",
                                             "commitOid": "a" * 40})
        return httpx.Response(200, json={})

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    huggingface_hub.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(hub)))
    try:
        assert main(["export", str(run), "--format", "adapter", "--out", str(tmp_path / "a"),
                     "--push-to-hub", "me/student"]) == 0
    finally:
        huggingface_hub.set_client_factory(lambda: httpx.Client())
    assert "POST /api/repos/create" in calls
    assert set(uploaded) == {"README.md", "student.safetensors"}
    assert uploaded["student.safetensors"] == (tmp_path / "a" / "student.safetensors").read_bytes()
    assert b"2603.08258" in uploaded["README.md"]


def test_trackers_get_scalars_and_sample_grids(tmp_path, monkeypatch):
    """run.report_to=all: TensorBoard events with the losses and the sample grid as an image,
    and an offline wandb run folder."""
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "prompts.txt").write_text("a cat\na red car\n")
    pipes = {"sd": tiny_pipes.save_tiny_sd(tmp_path / "sd"), "prompts": tmp_path / "prompts.txt"}
    cfg = tiny_pipes.make_cfg(pipes, tmp_path, steps=2)
    cfg.run.report_to, cfg.run.sample_every, cfg.run.checkpoint_every = "all", 2, 0
    run = distill(cfg, progress=False)
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss_student", "loss_fake", "grad_norm_student"} <= set(tags["scalars"])
    assert "samples" in tags["images"]
    assert [e.step for e in events.Scalars("loss_fake")] == [1, 2]
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))  # wandb's files live in the run folder


def test_single_file_export_loads_with_from_single_file(lorad_run, tmp_path):
    """The original layout, through diffusers' own conversion: from_single_file of the
    export gives the student's image."""
    base, run, student = lorad_run
    tiny_pipes.save_template(base, tmp_path / "base.safetensors")  # the test's layout is diffusers' own

    assert main(["export", str(run), "--format", "single-file", "--template", str(tmp_path / "base.safetensors"),
                 "--out", str(tmp_path / "single")]) == 0
    reference = pipe(base)
    reference.save_pretrained(tmp_path / "base-pipeline")  # from_single_file reads its configs from here
    loaded = StableDiffusionPipeline.from_single_file(
        str(tmp_path / "single" / "student.safetensors"), config=str(tmp_path / "base-pipeline"),
        vae=reference.vae, text_encoder=reference.text_encoder, tokenizer=reference.tokenizer,
        safety_checker=None, requires_safety_checker=False)
    torch.testing.assert_close(unet_out(loaded.unet), unet_out(student), rtol=0, atol=1e-6)
    assert (tmp_path / "single" / "README.md").is_file() and (tmp_path / "single" / "scheduler").is_dir()
    tiny_pipes.save_template(tiny_pipes.save_tiny_sd(tmp_path / "other", seed=4), tmp_path / "other.safetensors")
    assert main(["export", str(run), "--format", "single-file", "--template", str(tmp_path / "other.safetensors"),
                 "--out", str(tmp_path / "wrong")]) == 2  # another base's file is refused


def card_snippet(card: str) -> tuple[str, str]:
    """(language, code) of the fenced block under a card's "## Use"."""
    use = card.split("## Use", 1)[1]
    fence = use.index("```")
    language, _, rest = use[fence + 3:].partition("\n")
    return language.strip(), rest[:rest.index("```")].strip()


def unbound_names(code: str) -> set[str]:
    """Names a snippet uses that it neither imports nor assigns (builtins aside)."""
    import ast
    import builtins

    tree = ast.parse(code)
    bound = {a.asname or a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
             for a in n.names}
    bound |= {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return used - bound - set(dir(builtins))


def test_every_cards_snippet_is_runnable_as_written(lorad_run, tmp_path, monkeypatch):
    base, run, _ = lorad_run
    tiny_pipes.save_template(base, tmp_path / "base.safetensors")
    exports = {"pipeline": [], "adapter": [], "lora": ["--rank", "4"], "lora-kohya": ["--rank", "4"],
               "single-file": ["--template", str(tmp_path / "base.safetensors")]}
    snippets = {}
    for fmt, extra in exports.items():
        assert main(["export", str(run), "--format", fmt, "--out", str(tmp_path / fmt), *extra]) == 0
        language, code = card_snippet((tmp_path / fmt / "README.md").read_text())
        snippets[fmt] = code
        for placeholder in ("BASE", "FOLDER", "OWNER", "prompt,", "..."):
            assert placeholder not in code, (fmt, code)
        if language == "python":
            compile(code, fmt, "exec")
            assert unbound_names(code) == set(), (fmt, code)
            assert ".images[0]" in code and str((tmp_path / fmt).resolve()) in code
        else:
            assert language == "bash" and code.startswith("wadi sample ")
    for fmt in ("adapter", "lora", "lora-kohya", "single-file"):
        assert str(base) in snippets[fmt]  # the base model's real path
    kohya = (tmp_path / "lora-kohya" / "README.md").read_text()
    assert "in kohya's layout (A1111, ComfyUI)" in kohya and f"In A1111 or ComfyUI: the base model `{base}`" in kohya
    monkeypatch.chdir(tmp_path)
    exec(compile(snippets["pipeline"], "card", "exec"), {})  # the exported pipeline, as its card says
    assert (tmp_path / "image.png").is_file()


def test_a_single_file_export_named_as_a_file_is_that_file(lorad_run, tmp_path, capsys):
    from safetensors.torch import load_file

    base, run, _ = lorad_run
    tiny_pipes.save_template(base, tmp_path / "base.safetensors")
    out = tmp_path / "models" / "wadi-1step.safetensors"
    out.parent.mkdir()
    args = ["export", str(run), "--format", "single-file", "--template", str(tmp_path / "base.safetensors"),
            "--out", str(out)]
    assert main(args) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["wadi-1step.md", "wadi-1step.safetensors",
                                                             "wadi-1step.scheduler"]
    assert (out.parent / "wadi-1step.scheduler" / "scheduler_config.json").is_file()
    assert load_file(str(out)).keys() == load_file(str(tmp_path / "base.safetensors")).keys()
    assert f'from_single_file("{out.resolve()}"' in (out.parent / "wadi-1step.md").read_text()
    capsys.readouterr()
    assert main(args) == 2  # not overwritten without --force
    assert f"--out {out} exists; pass --force" in capsys.readouterr().err


def test_export_options_that_do_not_belong_and_that_are_missing_read_differently(lorad_run, tmp_path, capsys):
    _, run, _ = lorad_run
    for extra, message in [(["--format", "pipeline", "--rank", "4"],
                            "--rank is for --format lora or lora-kohya, not --format pipeline"),
                           (["--format", "lora-kohya"], "--format lora-kohya needs --rank R, the LoRA's rank"),
                           (["--format", "lora", "--template", "x"],
                            "--template is for --format single-file, not --format lora"),
                           (["--format", "single-file"], "--format single-file needs --template FILE")]:
        extra = extra + (["--rank", "4"] if extra[1] == "lora" else [])
        assert main(["export", str(run), "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_sampling_a_lora_export_says_how_in_one_line(lorad_run, tmp_path, capsys):
    _, run, _ = lorad_run
    assert main(["export", str(run), "--format", "lora", "--rank", "4", "--out", str(tmp_path / "lora")]) == 0
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "lora"), "--prompt", "a cat", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a LoRA export, which wadi does not sample" in err, err
    assert f"pipe.load_lora_weights({str(tmp_path / 'lora')!r}, weight_name='pytorch_lora_weights.safetensors')" in err
