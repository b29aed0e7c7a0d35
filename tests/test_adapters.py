"""The one adapter interface: attach, trainable parameters, merge, save, load, for all kinds."""

import json

import pytest
import torch
from conftest import pixart_inputs, tiny_pixart, tiny_unet, unet_inputs
from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

from wadi import ADAPTERS, AdapterConfig, attach, load_adapter
from wadi.adapters.lorad import LoRaDLinear
from wadi.adapters.targets import PRESETS, select_linears


def run_unet(model):
    x, t, c = unet_inputs()
    with torch.no_grad():
        return model(x, t, encoder_hidden_states=c).sample


def perturb(adapter, seed=3):
    """Move every trainable tensor off its initial value so outputs differ from the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.trainable_parameters().values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", ADAPTERS)
def test_attach_starts_at_base_and_trains_only_adapter(kind):
    base_out = run_unet(tiny_unet())
    adapter = attach(tiny_unet(), AdapterConfig(kind=kind, rank=4, targets="unet-student"))
    torch.testing.assert_close(run_unet(adapter.model), base_out, rtol=1e-5, atol=1e-5)
    trainable = adapter.trainable_parameters()
    # The count from the layer shapes: LoRaD r (out + in/2), LoRA r (in + out), DoRA adds
    # one magnitude per output unit; full fine-tuning trains everything.
    base = tiny_unet()
    per_layer = {"lorad": lambda o, i: 4 * (o + i // 2), "lora": lambda o, i: 4 * (i + o),
                 "dora": lambda o, i: 4 * (i + o) + o, "dora-frozen": lambda o, i: 4 * (i + o)}
    expected = (sum(p.numel() for p in base.parameters()) if kind == "full" else
                sum(per_layer[kind](base.get_submodule(n).out_features, base.get_submodule(n).in_features)
                    for n in adapter.target_names))
    assert adapter.num_trainable() == expected
    # One optimiser step on the trainable parameters moves the output and nothing else.
    frozen = {n: p.detach().clone() for n, p in adapter.model.named_parameters() if n not in trainable}
    perturb(adapter)
    opt = torch.optim.SGD(trainable.values(), lr=0.1)
    x, t, c = unet_inputs()
    adapter.model(x, t, encoder_hidden_states=c).sample.pow(2).mean().backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in adapter.model.named_parameters() if n in frozen)
    assert not torch.allclose(run_unet(adapter.model), base_out, atol=1e-4)
    assert all(p.grad is not None for p in trainable.values())


def test_lorad_count_and_targets_follow_the_rule():
    model = tiny_unet()
    names = select_linears(model, PRESETS["unet-fake"])
    assert names and all(("proj_in" not in n and "time_emb_proj" not in n) for n in names)
    expected = sum(4 * (model.get_submodule(n).out_features + model.get_submodule(n).in_features // 2)
                   for n in names)
    adapter = attach(model, AdapterConfig(kind="lorad", rank=4, targets="unet-fake"))
    assert adapter.num_trainable() == expected
    assert all(isinstance(model.get_submodule(n), LoRaDLinear) for n in names)


@pytest.mark.parametrize("kind", ADAPTERS)
def test_merge_equals_unmerged_and_unmerge_restores(kind):
    adapter = attach(tiny_unet(), AdapterConfig(kind=kind, rank=4))
    perturb(adapter)
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    out = run_unet(adapter.model)
    adapter.merge()
    torch.testing.assert_close(run_unet(adapter.model), out, rtol=1e-5, atol=1e-5)
    adapter.unmerge()
    for k, v in adapter.model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ADAPTERS)
def test_save_load_into_fresh_model_same_output(kind, tmp_path):
    adapter = attach(tiny_unet(), AdapterConfig(kind=kind, rank=4))
    perturb(adapter)
    out = run_unet(adapter.model)
    path = adapter.save(tmp_path / "adapter.safetensors", extra_metadata={"preset": "test"})
    loaded = load_adapter(tiny_unet(), path)
    assert loaded.config.kind == kind and loaded.config.rank == 4
    torch.testing.assert_close(run_unet(loaded.model), out, rtol=1e-6, atol=1e-6)
    if kind != "full":  # only the adapter's tensors are in the file
        from safetensors import safe_open
        from safetensors.torch import load_file
        stored = sum(t.numel() for t in load_file(str(path)).values())
        assert stored < sum(p.numel() for p in tiny_unet().parameters()) / 2
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert json.loads(meta["config"])["kind"] == kind and meta["preset"] == "test"


def test_load_wrong_rank_or_architecture_fails_and_writes_nothing(tmp_path):
    adapter = attach(tiny_unet(), AdapterConfig(kind="lorad", rank=4))
    perturb(adapter)
    path = adapter.save(tmp_path / "a.safetensors")

    other_rank = attach(tiny_unet(), AdapterConfig(kind="lorad", rank=8))
    snapshot = {k: v.clone() for k, v in other_rank.state_dict().items()}
    with pytest.raises(ValueError, match="rank is 4 but this model's is 8"):
        other_rank.load(path)
    for k, v in other_rank.state_dict().items():
        assert torch.equal(v, snapshot[k])

    wider = tiny_unet(cross_attention_dim=48)
    wider_state = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(ValueError, match="fingerprint"):
        load_adapter(wider, path)
    assert not any(isinstance(m, LoRaDLinear) for m in wider.modules())  # model left as it was
    assert all(torch.equal(v, wider_state[k]) for k, v in wider.state_dict().items())

    with pytest.raises(ValueError, match="base model class"):
        load_adapter(tiny_pixart(), path)


def test_load_rejects_non_adapter_files(tmp_path):
    from safetensors.torch import save_file
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a wadi adapter file"):
        load_adapter(tiny_unet(), plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_adapter(tiny_unet(), junk)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(tiny_unet(), tmp_path / "missing.safetensors")


def test_dora_frozen_magnitude_stays_frozen_through_training():
    adapter = attach(tiny_unet(), AdapterConfig(kind="dora-frozen", rank=4))
    mags = {n: p.clone() for n, p in adapter.model.named_parameters() if "magnitude" in n}
    assert mags
    opt = torch.optim.AdamW(adapter.trainable_parameters().values(), lr=1e-2)
    x, t, c = unet_inputs()
    for _ in range(3):
        opt.zero_grad()
        adapter.model(x, t, encoder_hidden_states=c).sample.pow(2).mean().backward()
        opt.step()
    for n, p in adapter.model.named_parameters():
        if "magnitude" in n:
            assert torch.equal(p, mags[n])


@pytest.mark.parametrize("kind", ["lorad", "lora", "dora"])
def test_merged_unet_saves_as_stock_diffusers_model(kind, tmp_path):
    adapter = attach(tiny_unet(), AdapterConfig(kind=kind, rank=4))
    perturb(adapter)
    out = run_unet(adapter.model)
    plain = adapter.merged_model()
    plain.save_pretrained(tmp_path / "unet")
    stock = UNet2DConditionModel.from_pretrained(tmp_path / "unet")  # strict load by default
    assert set(stock.state_dict()) == set(tiny_unet().state_dict())
    torch.testing.assert_close(run_unet(stock), out, rtol=1e-5, atol=1e-5)


def test_merged_pixart_saves_as_stock_diffusers_model(tmp_path):
    adapter = attach(tiny_pixart(), AdapterConfig(kind="lorad", rank=4, targets="dit-student"))
    assert not any("adaln_single" in n for n in adapter.target_names)
    perturb(adapter)
    with torch.no_grad():
        out = adapter.model(**pixart_inputs()).sample
    adapter.merged_model().save_pretrained(tmp_path / "transformer")
    stock = PixArtTransformer2DModel.from_pretrained(tmp_path / "transformer")
    with torch.no_grad():
        torch.testing.assert_close(stock(**pixart_inputs()).sample, out, rtol=1e-5, atol=1e-5)


def test_bad_config_and_targets():
    with pytest.raises(ValueError, match="unknown adapter kind 'lokr'"):
        AdapterConfig(kind="lokr")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        AdapterConfig(kind="lora", rank=0)
    with pytest.raises(ValueError, match="unknown target preset 'unet-teacher'"):
        attach(tiny_unet(), AdapterConfig(targets="unet-teacher"))
    with pytest.raises(ValueError, match="selects no nn.Linear layer"):
        attach(tiny_unet(), AdapterConfig(targets={"include": ["no_such_block"]}))


def _without_backbone(path):
    """The file as wadi wrote it before adapters recorded their backbone kind."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del meta["backbone"]
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("kind", ["lorad", "lora"])
def test_the_backbone_kind_is_recorded_not_guessed_and_old_files_still_load(tmp_path, kind):
    from safetensors import safe_open

    # A pixel UNet and an SD UNet are the same class: only the file can say which it was.
    adapter = attach(tiny_unet(), AdapterConfig(kind=kind, rank=4), backbone="pixel")
    perturb(adapter)
    path = adapter.save(tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["backbone"] == "pixel"
    loaded = load_adapter(tiny_unet(), path)
    assert loaded.backbone == "pixel"
    expected = run_unet(loaded.merged_model())

    _without_backbone(path)
    old = load_adapter(tiny_unet(), path)
    assert old.backbone == "sd"  # the first kind whose denoiser class the model is
    assert torch.equal(run_unet(old.merged_model()), expected)


def test_another_base_is_refused_naming_the_python_argument(tmp_path):
    adapter = attach(tiny_unet(seed=0), AdapterConfig(kind="lorad", rank=4))
    perturb(adapter)
    path = adapter.save(tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=r"or allow it explicitly \(allow_other_base=True\)$"):
        load_adapter(tiny_unet(seed=1), path)
    assert load_adapter(tiny_unet(seed=1), path, allow_other_base=True).backbone == "sd"


def test_a_student_from_an_adapter_file_reads_the_file_once(tmp_path, monkeypatch):
    from tiny_pipes import save_tiny_sd

    import wadi.adapters.file
    from wadi.artifacts.students import load_student
    from wadi.models.backbones import BackboneSpec

    base = save_tiny_sd(tmp_path / "sd")
    adapter = attach(UNet2DConditionModel.from_pretrained(base, subfolder="unet"), AdapterConfig(kind="full"))
    path = adapter.save(tmp_path / "full.safetensors")  # a full adapter: the whole UNet
    reads, real = [], wadi.adapters.file.read
    monkeypatch.setattr(wadi.adapters.file, "read", lambda p: reads.append(p) or real(p))
    student = load_student(path, BackboneSpec(path=str(base)))
    assert reads == [path]
    assert torch.equal(student.net.state_dict()["conv_in.weight"], adapter.model.state_dict()["conv_in.weight"])


def test_an_adapter_file_is_checked_once_per_load(tmp_path, monkeypatch):
    from wadi.adapters.file import AdapterFile

    adapter = attach(tiny_unet(), AdapterConfig(rank=4, targets={"include": ["to_q"]}))
    path = adapter.save(tmp_path / "a.safetensors")
    checks, real = [], AdapterFile.check
    monkeypatch.setattr(AdapterFile, "check", lambda self, *a, **k: checks.append(a) or real(self, *a, **k))
    load_adapter(tiny_unet(), path)
    assert len(checks) == 1 and checks[0][5] is not None  # one check, and it is the full one (fingerprint)
