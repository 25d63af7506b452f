"""Tools beside the library, never on the training path: analysis and analyze, the paper's weight analysis
(numbers, then figures); pytorch_references and import_timm, PyTorch/timm as references for tests, lessons
and benchmarks (timm's ResMLP holding our weights); gradcheck, finite differences and autograd gradients.
"""
