"""The ResMLP block and the whole model against timm's ResMLP with identical weights; presets,
initialization, gradient semantics and weight loading."""
import numpy as np
import pytest

from minimlp import create_model
from minimlp.backend import to_numpy
from minimlp.tools.gradcheck import numerical_gradients, relative_error
from minimlp.layers import cross_entropy
from minimlp.model import BLOCK_PARAMETERS, MODEL_ALIASES, block_backward, block_forward, preset_name
from minimlp.tools.pytorch_references import timm, timm_twin, torch
from minimlp.weights import WeightsError, is_affine, official_to_timm, timm_to_official

SMALL = dict(num_classes=7, img_size=16, patch_size=4, dim=12, depth=2)  # 16 patches, 48 hidden


class FixedMasks(torch.nn.Module):
    """Stands in for timm's DropPath: applies the given per-image masks, one per call, in turn."""

    def __init__(self, masks):
        super().__init__()
        self.masks = list(masks)

    def forward(self, x):
        return x * torch.from_numpy(self.masks.pop(0))[:, None, None]


def _timm_block_name(short):
    """Our short block name -> the timm ResBlock's parameter name (e.g. gamma_1 -> ls1)."""
    (name,) = official_to_timm({f"blocks.0.{short}": np.zeros(1)})
    return name[len("blocks.0."):]


def _by_our_names(tensors):
    """{timm block name: tensor} -> {our short name: numpy array}, Affine [1, 1, d] as [d]."""
    arrays = {short: tensors[_timm_block_name(short)].detach().numpy() for short in BLOCK_PARAMETERS}
    return {short: value.reshape(-1) if is_affine(short) else value for short, value in arrays.items()}


def _block(xp, rng, patches=9, dim=4):
    """A timm ResBlock with random (not initial) parameters, and the same parameters for ours."""
    block = timm.models.mlp_mixer.ResBlock(dim, patches).double()
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.copy_(torch.from_numpy(rng.normal(size=tuple(parameter.shape))))
    return block, {short: xp.asarray(value) for short, value in _by_our_names(dict(block.named_parameters())).items()}


@pytest.mark.parametrize("drop", [False, True])
def test_block_matches_timm(xp, drop):
    rng = np.random.default_rng(0)
    block, params = _block(xp, rng)
    batch_first = rng.normal(size=(5, 9, 4))  # timm's (B, N, d)
    masks = (np.array([0, 2.0, 2.0, 0, 2.0]), np.array([2.0, 0, 2.0, 2.0, 0])) if drop else (None, None)
    if drop:
        block.drop_path = FixedMasks(masks)
    tokens = xp.asarray(np.ascontiguousarray(batch_first.transpose(1, 0, 2)))
    out, cache = block_forward(tokens, params, tuple(None if m is None else xp.asarray(m) for m in masks))
    dout = rng.normal(size=out.shape)
    dtokens, grads = block_backward(xp.asarray(dout), cache)

    x = torch.tensor(batch_first, requires_grad=True)
    timm_out = block(x)
    (timm_out * torch.from_numpy(dout.transpose(1, 0, 2))).sum().backward()
    assert relative_error(out, timm_out.detach().numpy().transpose(1, 0, 2)) < 1e-10
    assert relative_error(dtokens, x.grad.numpy().transpose(1, 0, 2)) < 1e-10
    timm_grads = _by_our_names({name: p.grad for name, p in block.named_parameters()})
    for short in BLOCK_PARAMETERS:
        assert relative_error(grads[short], timm_grads[short]) < 1e-10, short


def test_block_matches_finite_differences(xp):
    rng = np.random.default_rng(1)
    _, params = _block(xp, rng, patches=4, dim=3)
    tokens = xp.asarray(rng.normal(size=(4, 2, 3)))
    masks = (xp.asarray([0.0, 2.0]), xp.asarray([2.0, 2.0]))
    out, cache = block_forward(tokens, params, masks)
    dout = xp.asarray(rng.normal(size=out.shape))
    dtokens, grads = block_backward(dout, cache)
    names = list(params)

    def forward(tokens, *values):
        return block_forward(tokens, dict(zip(names, values)), masks)[0]

    numerical = numerical_gradients(forward, [tokens] + [params[n] for n in names], dout)
    assert relative_error(dtokens, numerical[0]) < 1e-7
    for name, expected in zip(names, numerical[1:]):
        assert relative_error(grads[name], expected) < 1e-7, name


def _compare_with_timm(model, twin, images, labels, dtype, tolerance):
    logits = model.forward(images)
    loss, dlogits = cross_entropy(logits, labels)
    model.backward(dlogits)
    timm_logits = twin(torch.from_numpy(images).to(dtype))
    torch.nn.functional.cross_entropy(timm_logits, torch.from_numpy(labels)).backward()
    assert relative_error(logits, timm_logits.detach().double().numpy()) < tolerance
    timm_grads = {name: p.grad.double().numpy() for name, p in twin.named_parameters()}
    ours = official_to_timm({name: to_numpy(g) for name, g in model.grads.items()})
    assert set(ours) == set(timm_grads)
    worst = max(timm_grads, key=lambda name: relative_error(ours[name], timm_grads[name]))
    assert relative_error(ours[worst], timm_grads[worst]) < tolerance, worst


@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-9), ("float32", 1e-4)])
def test_small_model_matches_timm(xp, device, dtype, tolerance):
    model = create_model("resmlp_tiny", device=device, dtype=dtype, seed=0, **SMALL)
    _randomize(model, np.random.default_rng(2))  # initial LayerScale/Affine values would hide bugs
    twin = timm_twin(model, dtype=getattr(torch, dtype))
    rng = np.random.default_rng(3)
    images = rng.normal(size=(4, 3, 16, 16)).astype(dtype)
    _compare_with_timm(model, twin, images, rng.integers(0, 7, size=4), getattr(torch, dtype), tolerance)


@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-9), ("float32", 1e-4)])
def test_resmlp_s12_matches_timm(xp, device, dtype, tolerance):
    model = create_model("resmlp_s12", device=device, dtype=dtype, seed=0)
    twin = timm.create_model("resmlp_12_224").to(getattr(torch, dtype))  # converted before loading
    assert sum(p.numel() for p in twin.parameters()) == model.num_params()
    twin.load_state_dict({name: torch.from_numpy(value) for name, value in official_to_timm(model.state_dict()).items()})
    rng = np.random.default_rng(4)
    images = rng.normal(size=(2, 3, 224, 224)).astype(dtype)
    _compare_with_timm(model, twin, images, np.array([3, 999]), getattr(torch, dtype), tolerance)


def _randomize(model, rng):
    model.load_state_dict({name: rng.normal(scale=0.3, size=value.shape) + (1 if name.endswith("alpha") else 0)
                           for name, value in model.state_dict().items()})


def test_backward_overwrites_and_never_accumulates(xp, device):
    model = create_model("resmlp_tiny", device=device, dtype="float64", **SMALL)
    images = np.random.default_rng(5).normal(size=(3, 3, 16, 16))
    _, dlogits = cross_entropy(model.forward(images), np.array([0, 1, 2]))
    model.backward(dlogits)
    first = to_numpy(model.parameters.grad).copy()
    model.forward(images)
    model.backward(dlogits)
    assert np.abs(first).max() > 0
    np.testing.assert_array_equal(to_numpy(model.parameters.grad), first)  # the same, not doubled
    with pytest.raises(RuntimeError, match="forward"):
        model.backward(dlogits)  # the cache is freed: a second backward needs a second forward


def test_grads_are_views_of_one_flat_buffer(xp, device):
    model = create_model("resmlp_tiny", device=device, dtype="float32", **SMALL)
    model.parameters.grad[...] = 3
    assert all(float(g.min()) == 3 for g in model.grads.values())
    model.parameters.data[...] = 2
    assert all(float(v.max()) == 2 for v in model.params.values())


# ---------------------------------------------------------------------------------------------
# Presets and initialization (docs/reference.md, Presets and Initialization)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, millions, layerscale, timm_name", [
    ("resmlp_s12", 15.35, 0.1, "resmlp_12_224"), ("resmlp_s24", 30.0, 1e-5, "resmlp_24_224"),
    ("resmlp_s36", 44.7, 1e-6, "resmlp_36_224"), ("resmlp_b24", 129.1, 1e-6, "resmlp_big_24_224")])
def test_presets_have_the_published_size(name, millions, layerscale, timm_name):
    """The published sizes and deit's LayerScale, and a second witness: every parameter's name and shape
    equals timm's model (built on PyTorch's meta device: shapes, no memory)."""
    model = create_model(name, dtype="float32")
    assert round(model.num_params() / 1e6, 2 if name == "resmlp_s12" else 1) == millions
    assert float(model.params["blocks.0.gamma_1"][0]) == np.float32(layerscale)
    with torch.device("meta"):
        twin = timm.create_model(timm_name)
    shapes = {timm_key: value.shape for timm_key, value in official_to_timm(model.state_dict()).items()}
    assert shapes == {timm_key: tuple(p.shape) for timm_key, p in twin.named_parameters()}


@pytest.mark.parametrize("alias", sorted(MODEL_ALIASES))
def test_deit_and_timm_names_give_the_same_model(alias):
    # DeiT's registry (resmlp_12, resmlpB_24) and timm's (resmlp_12_224, and the older resmlp_12_distilled_224,
    # now timm's resmlp_12_224 with its distilled weights): the preset they map to has every parameter of
    # timm's model of that architecture
    timm_name = {"resmlp_12": "resmlp_12_224", "resmlp_24": "resmlp_24_224", "resmlp_36": "resmlp_36_224",
                 "resmlpB_24": "resmlp_big_24_224"}.get(alias, alias.replace("distilled_", ""))
    model = create_model(alias, dtype="float32")
    assert model.config["name"] == preset_name(alias) != alias
    with torch.device("meta"):
        twin = timm.create_model(timm_name)
    shapes = {timm_key: value.shape for timm_key, value in official_to_timm(model.state_dict()).items()}
    assert shapes == {timm_key: tuple(p.shape) for timm_key, p in twin.named_parameters()}


def test_official_initialization():
    model = create_model("resmlp_s12", dtype="float64", seed=7)
    p = model.state_dict()
    fc1 = p["blocks.3.mlp.fc1.weight"]
    assert abs(fc1.std() - 0.02) < 2e-4 and abs(fc1.mean()) < 2e-4 and np.abs(fc1).max() < 2.0
    assert abs(p["blocks.0.attn.weight"].std() - 0.02) < 1e-3 and abs(p["head.weight"].std() - 0.02) < 1e-3
    assert all(not p[n].any() for n in ["blocks.0.attn.bias", "blocks.1.mlp.fc2.bias", "head.bias", "norm.beta"])
    assert (p["blocks.2.norm1.alpha"] == 1).all() and (p["norm.alpha"] == 1).all()
    bound = 1 / np.sqrt(3 * 16 * 16)  # PyTorch's Conv2d default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    conv = p["patch_embed.proj.weight"]
    assert np.abs(conv).max() <= bound and np.abs(conv).max() > 0.99 * bound
    assert abs(conv.std() - bound / np.sqrt(3)) < 0.01 * bound
    assert np.abs(p["patch_embed.proj.bias"]).max() <= bound and p["patch_embed.proj.bias"].std() > 0.4 * bound
    np.testing.assert_array_equal(create_model("resmlp_s12", dtype="float64", seed=7).state_dict()["head.weight"],
                                  p["head.weight"])  # the seed decides everything


def test_overrides_and_errors():
    model = create_model("resmlp_s12", num_classes=10, img_size=64, patch_size=8, dtype="float32")
    assert model.params["blocks.0.attn.weight"].shape == (64, 64) and model.params["head.weight"].shape == (10, 384)
    assert model.forward(np.zeros((1, 3, 64, 64), np.float32)).shape == (1, 10)
    with pytest.raises(ValueError, match="unknown model 'resmlp_99'.*resmlp_s12"):
        create_model("resmlp_99")
    with pytest.raises(ValueError, match="patch_size must be between 1 and img_size 32, got 0"):
        create_model("resmlp_tiny", patch_size=0)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        create_model("resmlp_tiny", img_size=30)
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, 32, 32\), got \(2, 3, 28, 28\)"):
        create_model("resmlp_tiny").forward(np.zeros((2, 3, 28, 28)))


# ---------------------------------------------------------------------------------------------
# Weights: official and timm names, files, clear errors
# ---------------------------------------------------------------------------------------------
def test_official_names_convert_as_timm_converts_them():
    """official_to_timm against timm's own converter of deit checkpoints (mlp_mixer.checkpoint_filter_fn,
    which timm applies to the published .pth files), and timm_to_official back."""
    rng = np.random.default_rng(6)  # random values: at initialization gamma_1 == gamma_2 would hide a swap
    shapes = create_model("resmlp_tiny", **SMALL).parameters.shapes
    official = {name: rng.normal(size=shape) for name, shape in shapes.items()}
    theirs = timm.models.mlp_mixer.checkpoint_filter_fn({k: torch.from_numpy(v) for k, v in official.items()}, None)
    ours = official_to_timm(official)
    assert set(ours) == set(theirs) and len(ours) == len(official)
    for name, tensor in theirs.items():
        np.testing.assert_array_equal(ours[name], tensor.numpy(), err_msg=name)
        assert ours[name].shape == tuple(tensor.shape), name
    back = timm_to_official({name: tensor.numpy() for name, tensor in theirs.items()})
    assert set(back) == set(official)
    for name, value in official.items():
        assert back[name].shape == value.shape, name
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_timm_and_official_names_load_identically(tmp_path):
    source = create_model("resmlp_tiny", **SMALL, seed=1)
    official, timm_named = source.state_dict(), official_to_timm(source.state_dict())
    assert "stem.proj.weight" in timm_named and timm_named["norm.alpha"].shape == (1, 1, 12)
    a, b = create_model("resmlp_tiny", **SMALL, seed=2), create_model("resmlp_tiny", **SMALL, seed=3)
    a.load_state_dict(official)
    b.load_state_dict(timm_named)
    for name in official:
        np.testing.assert_array_equal(a.state_dict()[name], b.state_dict()[name])
    np.testing.assert_array_equal(a.parameters.data, source.parameters.data)


def test_weights_files_npz_and_safetensors(tmp_path):
    from safetensors.numpy import save_file
    source = create_model("resmlp_tiny", **SMALL, seed=4)
    np.savez(tmp_path / "official.npz", **source.state_dict())
    save_file({k: np.ascontiguousarray(v) for k, v in official_to_timm(source.state_dict()).items()},
              str(tmp_path / "timm.safetensors"))
    for filename in ["official.npz", "timm.safetensors"]:
        model = create_model("resmlp_tiny", **SMALL, seed=5)
        model.load_weights(tmp_path / filename)
        np.testing.assert_array_equal(model.parameters.data, source.parameters.data)
    with pytest.raises(WeightsError, match="no such weights file"):
        model.load_weights(tmp_path / "absent.npz")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="broken.safetensors: not a readable"):
        model.load_weights(tmp_path / "broken.safetensors")
    (tmp_path / "weights.pth").write_bytes(b"a PyTorch pickle")
    with pytest.raises(WeightsError, match="unknown weights format '.pth'"):
        model.load_weights(tmp_path / "weights.pth")


def test_mismatched_weights_fail_clearly():
    weights = create_model("resmlp_tiny", **SMALL).state_dict()
    model = create_model("resmlp_tiny", **{**SMALL, "num_classes": 5})
    with pytest.raises(WeightsError, match=r"wrong shape: head.weight \(7, 12\) \(model has \(5, 12\)\)"):
        model.load_state_dict(weights)
    del weights["norm.beta"]
    weights["blocks.9.gamma_1"] = np.ones(12)
    with pytest.raises(WeightsError, match=r"missing: norm.beta.*unexpected: blocks.9.gamma_1"):
        create_model("resmlp_tiny", **SMALL).load_state_dict(weights)
