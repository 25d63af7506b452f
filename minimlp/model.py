"""ResMLP (Touvron et al. 2021): patch embedding, residual blocks of token mixing and channel MLP,
Affine, mean pooling, linear head. Forward and backward written by hand from minimlp.layers.

    model = create_model("resmlp_s12", num_classes=1000, img_size=224, device="cpu", dtype="float32")
    logits = model.forward(images)          # images (B, 3, H, W) -> logits (B, num_classes)
    model.backward(dlogits)                 # OVERWRITES model.grads (it never accumulates)

Parameters and gradients live in two flat buffers (minimlp.parameters); `model.params` and
`model.grads` are dicts of views into them, keyed by the official checkpoint names.
"""
import numpy as np

from . import backend
from .ops import REFERENCE_OPERATIONS, select
from .layers import drop_path_mask
from .parameters import Parameters
from .weights import WeightsError, read_weights, timm_to_official

# docs/reference.md, Presets; resmlp_tiny is ours, for CPU experiments on 32 px images.
PRESETS = {
    "resmlp_tiny": dict(img_size=32, patch_size=4, dim=128, depth=6, layerscale_init=0.1, num_classes=10),
    "resmlp_s12": dict(img_size=224, patch_size=16, dim=384, depth=12, layerscale_init=0.1, num_classes=1000),
    "resmlp_s24": dict(img_size=224, patch_size=16, dim=384, depth=24, layerscale_init=1e-5, num_classes=1000),
    "resmlp_s36": dict(img_size=224, patch_size=16, dim=384, depth=36, layerscale_init=1e-6, num_classes=1000),
    "resmlp_b24": dict(img_size=224, patch_size=8, dim=768, depth=24, layerscale_init=1e-6, num_classes=1000),
}

# The same models under DeiT's names (facebookresearch/deit resmlp_models.py) and timm's (mlp_mixer.py; its
# distilled weights have the same architecture), so that their users' --model works as it is.
MODEL_ALIASES = {**{f"resmlp_{depth}": f"resmlp_s{depth}" for depth in (12, 24, 36)}, "resmlpB_24": "resmlp_b24",
                 **{f"resmlp_{depth}_{kind}224": f"resmlp_s{depth}" for depth in (12, 24, 36)
                    for kind in ("", "distilled_")},
                 "resmlp_big_24_224": "resmlp_b24", "resmlp_big_24_distilled_224": "resmlp_b24"}


def preset_name(name):
    """Our preset's name for `name`: a preset's own name, or DeiT's or timm's for the same model."""
    return MODEL_ALIASES.get(name, name)


BLOCK_PARAMETERS = ["gamma_1", "gamma_2", "norm1.alpha", "norm1.beta", "attn.weight", "attn.bias",
                    "norm2.alpha", "norm2.beta", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]


def create_model(name, device="cpu", dtype="float32", seed=0, fast=True, ops=None, **overrides):
    """A ResMLP preset by name; any of its settings (num_classes, img_size, patch_size, dim, depth,
    layerscale_init, drop_path) can be overridden. ops: the operations it runs (minimlp.ops.select, the
    object the loss and the optimizer are given too); by default select(device, dtype, fast): fast=False
    runs the reference layers only."""
    name = preset_name(name)
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(PRESETS)} (or DeiT's or timm's name "
                         "of one of them)")
    config = {**PRESETS[name], **{key: value for key, value in overrides.items() if value is not None}}
    device = backend.resolve_device(device)
    ops = ops or select(device, dtype, fast)
    return ResMLP(**config, device=device, dtype=dtype, seed=seed, name=name, ops=ops)


# ---------------------------------------------------------------------------------------------
# One residual block, tokens (N, B, d) -> (N, B, d):
#   z = x + drop_path(gamma_1 * attn(norm1(x)))          token mixing across patches
#   y = z + drop_path(gamma_2 * fc2(GELU(fc1(norm2(z)))))  channel MLP, d -> 4d -> d
# The three Linears leave their bias to the layer after them (GELU, residual_forward), which adds it in
# its own pass over the activations; a fast path (minimlp.ops) does each such pass as one fused loop.
# `op` is the namespace of operations the model runs (minimlp.ops.select): the reference layers, or
# a fast path with the same functions.
# ---------------------------------------------------------------------------------------------
def block_forward(tokens, p, masks=(None, None), op=REFERENCE_OPERATIONS):
    """p: the block's parameters by short name (BLOCK_PARAMETERS); masks: drop-path masks (B,) or None."""
    patches, images, dim = tokens.shape
    normed, norm1 = op.affine_forward(tokens, p["norm1.alpha"], p["norm1.beta"])
    mixed, attn = op.token_mixing_forward(normed, p["attn.weight"], None, half_result=True)
    middle, residual1 = op.residual_forward(tokens, mixed, p["attn.bias"][:, None, None], p["gamma_1"], masks[0])

    normed, norm2 = op.affine_forward(middle, p["norm2.alpha"], p["norm2.beta"])
    hidden, fc1 = op.linear_forward(normed.reshape(patches * images, dim), p["mlp.fc1.weight"], None, half_result=True)
    activated, act = op.bias_gelu_forward(hidden, p["mlp.fc1.bias"])
    channel_out, fc2 = op.linear_forward(activated, p["mlp.fc2.weight"], None, half_result=True)
    out, residual2 = op.residual_forward(middle, channel_out.reshape(tokens.shape), p["mlp.fc2.bias"],
                                         p["gamma_2"], masks[1])
    return out, (norm1, attn, residual1, norm2, fc1, act, fc2, residual2)


def block_backward(dout, cache, op=REFERENCE_OPERATIONS):
    """dout (N, B, d) -> (dtokens, {short name: gradient}). A residual passes its gradient through
    unchanged and adds the branch's: dx = dy + d(branch)/dx."""
    norm1, attn, residual1, norm2, fc1, act, fc2, residual2 = cache
    grads = {}
    dchannel_out, grads["mlp.fc2.bias"], grads["gamma_2"] = op.residual_backward(dout, residual2)
    dactivated, grads["mlp.fc2.weight"], _ = op.linear_backward(dchannel_out.reshape(-1, dout.shape[-1]), fc2,
                                                                half_dx=True)
    dhidden, grads["mlp.fc1.bias"] = op.bias_gelu_backward(dactivated, act)
    dnormed, grads["mlp.fc1.weight"], _ = op.linear_backward(dhidden, fc1, half_dx=True)
    # the skip path carries dout to `middle` unchanged: dmiddle = dout + the branch's gradient
    dmiddle, grads["norm2.alpha"], grads["norm2.beta"] = op.affine_backward(dnormed.reshape(dout.shape), norm2,
                                                                            skip=dout)

    dmixed, dbias, grads["gamma_1"] = op.residual_backward(dmiddle, residual1)
    grads["attn.bias"] = dbias.reshape(-1)  # it was added as (N, 1, 1)
    dnormed, grads["attn.weight"], _ = op.token_mixing_backward(dmixed, attn, half_dx=True)
    dtokens, grads["norm1.alpha"], grads["norm1.beta"] = op.affine_backward(dnormed, norm1, skip=dmiddle)
    return dtokens, grads


class ResMLP:
    """ops: the operations the model runs (minimlp.ops.select for its device and dtype), kept as `model.ops`."""

    def __init__(self, num_classes, img_size, patch_size, dim, depth, layerscale_init, ops, drop_path=0.0,
                 in_chans=3, mlp_ratio=4, device="cpu", dtype="float32", seed=0, name="resmlp"):
        if patch_size < 1 or img_size < patch_size:
            raise ValueError(f"patch_size must be between 1 and img_size {img_size}, got {patch_size}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        self.config = dict(name=name, num_classes=num_classes, img_size=img_size, patch_size=patch_size, dim=dim,
                           depth=depth, layerscale_init=layerscale_init, drop_path=drop_path, in_chans=in_chans,
                           mlp_ratio=mlp_ratio)
        self.device = backend.resolve_device(device)
        self.xp = backend.get_module(self.device)
        self.dtype = np.dtype(dtype)
        self.ops = ops  # the reference layers, or the device's fast path
        self.num_patches = (img_size // patch_size) ** 2
        self.parameters = Parameters(self._shapes(), self.xp, self.dtype)
        self.params, self.grads = self.parameters.values, self.parameters.grads
        self._block_params = [self.block_parameters(i) for i in range(depth)]
        self.drop_path_rng = np.random.default_rng([seed, 1])  # checkpointed, so resume draws the same masks
        self.drop_path_shard = (0, 1)  # (rank, K) in data parallel training (_drop_path_masks)
        self._cache = None
        self.initialize(seed)

    def _shapes(self):
        c = self.config
        dim, hidden, patches = c["dim"], c["mlp_ratio"] * c["dim"], self.num_patches
        shapes = {"patch_embed.proj.weight": (dim, c["in_chans"], c["patch_size"], c["patch_size"]),
                  "patch_embed.proj.bias": (dim,)}
        block = {"gamma_1": (dim,), "gamma_2": (dim,), "norm1.alpha": (dim,), "norm1.beta": (dim,),
                 "attn.weight": (patches, patches), "attn.bias": (patches,), "norm2.alpha": (dim,),
                 "norm2.beta": (dim,), "mlp.fc1.weight": (hidden, dim), "mlp.fc1.bias": (hidden,),
                 "mlp.fc2.weight": (dim, hidden), "mlp.fc2.bias": (dim,)}
        for i in range(c["depth"]):
            shapes.update({f"blocks.{i}.{short}": block[short] for short in BLOCK_PARAMETERS})
        shapes.update({"norm.alpha": (dim,), "norm.beta": (dim,), "head.weight": (c["num_classes"], dim),
                       "head.bias": (c["num_classes"],)})
        return shapes

    def block_parameters(self, i):
        """Block i's parameters by short name ("attn.weight", "gamma_1", ...), as block_forward takes them."""
        return {short: self.params[f"blocks.{i}.{short}"] for short in BLOCK_PARAMETERS}

    def initialize(self, seed):
        """The official initialization (docs/reference.md, Initialization), drawn on the host so every device gets the same
        numbers: Linear weights trunc_normal(std 0.02), biases 0; the patch-embedding conv as PyTorch's
        Conv2d default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias; Affine alpha 1, beta 0;
        LayerScale gammas at layerscale_init."""
        rng = np.random.default_rng(seed)
        values = {}
        for name, shape in self.parameters.shapes.items():
            if name.startswith("patch_embed."):
                bound = 1.0 / np.sqrt(np.prod(self.parameters.shapes["patch_embed.proj.weight"][1:]))
                values[name] = rng.uniform(-bound, bound, shape)
            elif name.endswith(".weight"):
                values[name] = truncated_normal(rng, shape, std=0.02)
            elif name.endswith(".alpha"):
                values[name] = np.ones(shape)
            elif ".gamma_" in name:
                values[name] = np.full(shape, self.config["layerscale_init"])
            else:  # biases and Affine betas
                values[name] = np.zeros(shape)
        self.load_state_dict(values)

    # -----------------------------------------------------------------------------------------
    def forward(self, images, train=False):
        """images (B, in_chans, H, W), any array type -> logits (B, num_classes) on the model's device.
        train=True applies stochastic depth (when drop_path > 0). What backward needs is kept either way,
        until backward() or free_activations() drops it."""
        c = self.config
        images = backend.to_device(images, self.device, self.dtype)
        expected = (c["in_chans"], c["img_size"], c["img_size"])
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"{c['name']} expects images of shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(images.shape)}")
        batch = images.shape[0]
        self.free_activations()  # the previous batch's, before this one allocates its own
        op = self.ops
        tokens, embed = op.patch_embed_forward(images, self.params["patch_embed.proj.weight"],
                                               self.params["patch_embed.proj.bias"])
        blocks = []
        for p in self._block_params:
            tokens, block = block_forward(tokens, p, self._drop_path_masks(batch) if train else (None, None), op)
            blocks.append(block)
        normed, norm = op.affine_forward(tokens, self.params["norm.alpha"], self.params["norm.beta"])
        pooled, pool = op.mean_pool_forward(normed)
        logits, head = op.linear_forward(pooled, self.params["head.weight"], self.params["head.bias"])
        self._cache = (embed, blocks, norm, pool, head)
        return logits

    def backward(self, dlogits, need_dimages=False, grads_ready=None):
        """dlogits (B, num_classes) -> fills self.grads, OVERWRITING them (no accumulation: call
        backward once per forward). Returns dimages (B, C, H, W) if need_dimages, else None.
        grads_ready(offset), if given, is called as soon as parameters.grad[offset:] is final: backward fills
        the flat buffer from its end (head, norm, blocks N-1 .. 0) to its start (patch_embed), so data
        parallel training can start averaging the end while the rest is computed (minimlp.parallel.allreduce)."""
        if self._cache is None:
            raise RuntimeError("backward() needs a forward() first")
        embed, blocks, norm, pool, head = self._cache
        grads, op = self.grads, self.ops
        starts = {name: where.start for name, where in self.parameters.slices.items()}
        report = grads_ready or (lambda offset: None)
        dlogits = backend.to_device(dlogits, self.device, self.dtype)
        dpooled, grads["head.weight"][...], grads["head.bias"][...] = op.linear_backward(dlogits, head)
        dnormed = op.mean_pool_backward(dpooled, pool)
        dtokens, grads["norm.alpha"][...], grads["norm.beta"][...] = op.affine_backward(dnormed, norm)
        report(starts["norm.alpha"])
        for i in reversed(range(len(blocks))):
            dtokens, block_grads = block_backward(dtokens, blocks[i], op)
            for short, value in block_grads.items():
                grads[f"blocks.{i}.{short}"][...] = value
            report(starts[f"blocks.{i}.{BLOCK_PARAMETERS[0]}"])
        dimages, grads["patch_embed.proj.weight"][...], grads["patch_embed.proj.bias"][...] = op.patch_embed_backward(
            dtokens, embed, need_dimages)
        report(0)
        self.free_activations()
        return dimages

    def free_activations(self):
        """Drop what forward() kept for backward (after evaluation, before training allocates anew)."""
        self._cache = None

    def _drop_path_masks(self, batch):
        """Data parallel (drop_path_shard = (rank, K)): every rank draws the masks of the global batch of K*batch
        images from the same generator and keeps its own images' (global positions rank, rank + K, ...)."""
        rate = self.config["drop_path"]
        if rate == 0:
            return None, None
        rank, ranks = self.drop_path_shard
        return tuple(self.xp.ascontiguousarray(drop_path_mask(self.drop_path_rng, batch * ranks, rate, self.xp,
                                                              self.dtype)[rank::ranks]) for _ in range(2))

    # -----------------------------------------------------------------------------------------
    def state_dict(self):
        """{official name: host NumPy copy}."""
        return {name: backend.to_numpy(value).copy() for name, value in self.params.items()}

    def load_state_dict(self, state_dict):
        """Accepts official or timm names (Affine as [d] or [1, 1, d]); every entry must be present with
        the right shape, and nothing else."""
        incoming = timm_to_official(state_dict)
        missing = [name for name in self.params if name not in incoming]
        unexpected = [name for name in incoming if name not in self.params]
        wrong = [f"{name} {tuple(incoming[name].shape)} (model has {self.parameters.shapes[name]})"
                 for name in self.params if name in incoming and tuple(incoming[name].shape) != self.parameters.shapes[name]]
        problems = [f"{label}: {_first_few(names)}" for label, names in
                    [("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)] if names]
        if problems:
            raise WeightsError(f"weights do not fit {self.config['name']} (dim {self.config['dim']}, depth "
                               f"{self.config['depth']}, {self.num_patches} patches, {self.config['num_classes']} "
                               f"classes): " + "; ".join(problems))
        for name, value in incoming.items():
            self.params[name][...] = self.xp.asarray(value, dtype=self.dtype)

    def load_weights(self, path):
        """Load a .npz (official or timm names, or a train.py checkpoint) or a timm .safetensors file."""
        self.load_state_dict(read_weights(path))

    def num_params(self):
        return self.parameters.size


def truncated_normal(rng, shape, std, bound=2.0):
    """Normal(0, std) redrawn until every value lies in [-bound, bound] (torch's trunc_normal_ limits
    are absolute: with std 0.02 a redraw practically never happens)."""
    values = rng.normal(0.0, std, shape)
    outside = np.abs(values) > bound
    while outside.any():
        values[outside] = rng.normal(0.0, std, outside.sum())
        outside = np.abs(values) > bound
    return values


def _first_few(names, shown=5):
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
