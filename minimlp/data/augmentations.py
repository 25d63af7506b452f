"""The augmentations a run's settings turn on, in one line: train.py prints it at the start of every training run
(the demo, --data and --recipe alike), whatever chose each value (a flag, a default, the recipe, a checkpoint).

    augmentations: RandomResizedCrop scale 0.08-1 bicubic, horizontal flip 0.5, RandAugment rand-m9-mstd0.5-inc1,
    random erasing 0.25 (pixel, 1 box), Mixup 0.8 / CutMix 1 (probability 1, switch 0.5, mode batch), repeated
    augmentation (3 copies)
"""


def augmentations_line(settings):
    """settings: the run's completed flags (train.py's args, or a dict of them) -> 'augmentations: ...; off: ...'."""
    s = settings if isinstance(settings, dict) else vars(settings)
    on = [f"RandomResizedCrop scale {s['scale'][0]:g}-{s['scale'][1]:g} {s['train_interpolation']}"]
    off = []
    if s["hflip"] > 0:
        on.append(f"horizontal flip {s['hflip']:g}")
    else:
        off.append("flip")
    if s["aa"] not in (None, "none"):
        on.append(f"RandAugment {s['aa']}")
    else:
        off.append("RandAugment")
    if s["reprob"] > 0:
        boxes = "1 box" if s["recount"] == 1 else f"1 to {s['recount']} boxes"
        on.append(f"random erasing {s['reprob']:g} ({s['remode']}, {boxes})")
    else:
        off.append("random erasing")
    mixing = [f"Mixup {s['mixup']:g}"] if s["mixup"] > 0 else []
    if s["cutmix_minmax"] is not None:
        mixing.append(f"CutMix boxes {s['cutmix_minmax'][0]:g}-{s['cutmix_minmax'][1]:g} of the side")
    elif s["cutmix"] > 0:
        mixing.append(f"CutMix {s['cutmix']:g}")
    if mixing:
        switch = f", switch {s['mixup_switch_prob']:g}" if len(mixing) == 2 else ""
        on.append(" / ".join(mixing) + f" (probability {s['mixup_prob']:g}{switch}, mode {s['mixup_mode']})")
    else:
        off.append("Mixup/CutMix")
    if s["repeated_aug"]:
        on.append("repeated augmentation (3 copies)")
    else:
        off.append("repeated augmentation")
    return "augmentations: " + ", ".join(on) + (f"; off: {', '.join(off)}" if off else "")
