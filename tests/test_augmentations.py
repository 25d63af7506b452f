"""The line train.py prints at the start of a run: every augmentation that is on, and which are off."""
from minimlp.data.augmentations import augmentations_line

DEMO = dict(scale=(0.6, 1.0), train_interpolation="bilinear", hflip=0.5, aa="none", reprob=0.0, remode="pixel",
            recount=1, mixup=0.0, cutmix=0.0, cutmix_minmax=None, mixup_prob=1.0, mixup_switch_prob=0.5,
            mixup_mode="batch", repeated_aug=False)


def test_the_demo_has_the_crop_and_the_flip_on_and_says_what_is_off():
    assert augmentations_line(DEMO) == ("augmentations: RandomResizedCrop scale 0.6-1 bilinear, horizontal flip 0.5; "
                                        "off: RandAugment, random erasing, Mixup/CutMix, repeated augmentation")


def test_the_papers_recipe_names_every_augmentation_with_its_values():
    recipe = dict(DEMO, scale=(0.08, 1.0), train_interpolation="bicubic", aa="rand-m9-mstd0.5-inc1", reprob=0.25,
                  mixup=0.8, cutmix=1.0, repeated_aug=True)
    assert augmentations_line(recipe) == (
        "augmentations: RandomResizedCrop scale 0.08-1 bicubic, horizontal flip 0.5, RandAugment rand-m9-mstd0.5-inc1, "
        "random erasing 0.25 (pixel, 1 box), Mixup 0.8 / CutMix 1 (probability 1, switch 0.5, mode batch), repeated "
        "augmentation (3 copies)")


def test_cutmix_boxes_several_erased_boxes_and_no_flip():
    settings = dict(DEMO, hflip=0.0, reprob=0.5, remode="rand", recount=3, cutmix_minmax=(0.2, 0.8), mixup_prob=0.5,
                    mixup_mode="elem")
    assert augmentations_line(settings) == (
        "augmentations: RandomResizedCrop scale 0.6-1 bilinear, random erasing 0.5 (rand, 1 to 3 boxes), CutMix boxes "
        "0.2-0.8 of the side (probability 0.5, mode elem); off: flip, RandAugment, repeated augmentation")
