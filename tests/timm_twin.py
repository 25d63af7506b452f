"""timm's ResMLP (MlpMixer with ResBlock and Affine) built to match a minimlp model, holding its weights."""
from minimlp.weights import official_to_timm
from tests.reference import timm, torch


def timm_twin(model, dtype=torch.float64):
    """A timm ResMLP with the same configuration and the same weights as `model`."""
    c = model.config
    twin = timm.models.mlp_mixer.MlpMixer(
        num_classes=c["num_classes"], img_size=c["img_size"], in_chans=c["in_chans"], patch_size=c["patch_size"],
        num_blocks=c["depth"], embed_dim=c["dim"], mlp_ratio=c["mlp_ratio"], drop_path_rate=c["drop_path"],
        block_layer=timm.models.mlp_mixer.ResBlock, norm_layer=timm.models.mlp_mixer.Affine).to(dtype)
    weights = {name: torch.from_numpy(value) for name, value in official_to_timm(model.state_dict()).items()}
    twin.load_state_dict(weights)  # after .to(dtype): loading into float32 first would round float64 weights
    return twin
