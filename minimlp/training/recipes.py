"""The paper's training recipes, one per model (train.py --recipe).

The values are docs/reference.md's Training recipe: section 3.1 and Table 3 of the paper, the authors' list in
deit issue #106, and DeiT's main.py for what the list leaves to DeiT. lr 5e-3 is for the global batch of 2048:
a recipe run with another --batch-size (and no --lr) scales it linearly, as DeiT's rule does
(minimlp.training.config.apply_recipe).
"""
PAPER_RECIPE = dict(img_size=224, opt="lamb", lr=5e-3, weight_decay=0.2, batch_size=2048, epochs=400, warmup_epochs=5,
                    warmup_lr=1e-6, min_lr=1e-5, smoothing=0.1, repeated_aug=True, aa="rand-m9-mstd0.5-inc1",
                    train_interpolation="bicubic", hflip=0.5, reprob=0.25, remode="pixel", recount=1, mixup=0.8,
                    cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch", scale=(0.08, 1.0),
                    crop_pct=0.9, amp=False, clip_grad=0.0)
PAPER_BATCH_SIZE = 2048
# Stochastic depth: 0.05 is the published value for S12 (issue #106); none is published for the others,
# which take DeiT's default 0.1 (issue #117 gives 0.1 for 24 blocks when fine-tuning on CIFAR).
RECIPES = {"resmlp-s12": dict(PAPER_RECIPE, model="resmlp_s12", drop_path=0.05),
           "resmlp-s24": dict(PAPER_RECIPE, model="resmlp_s24", drop_path=0.1),
           "resmlp-s36": dict(PAPER_RECIPE, model="resmlp_s36", drop_path=0.1),
           "resmlp-b24": dict(PAPER_RECIPE, model="resmlp_b24", drop_path=0.1)}
