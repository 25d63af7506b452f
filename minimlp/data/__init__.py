"""The data pipeline, from files to normalized batches on the device. datasets: ImageFolder scanning (and the
flat ImageNet val folder); synthetic: the demo's shapes10; transforms and randaugment: decoding, crops,
flips and RandAugment with Pillow, in the loader's workers; sampler: each epoch's order (the shuffle,
repeated augmentation); loader and workers: reproducible parallel batches of uint8 images and the worker
pool; device_feed: the copy to the device and normalize; random_erasing and mixup: the augmentations that
run on the normalized batch on the device; augmentations: the line that names every augmentation a run has
on. Data flows one way through them: nothing here imports the
model, and the device side never reaches back into the Pillow side.
"""
