"""A training run around the one training step (minimlp.step): trainer, the epoch loop; evaluation, loss and
top-1/top-5; signals, how Ctrl-C, SIGTERM and SIGHUP stop a run; settings, config, recipes,
defaults_from_data and command_line, every flag declared once, filled in and checked; checkpoint and
run_folder, saving, resuming and where a run writes; progress, estimates and plot, what a run says and
draws; ema, the moving average of the weights; distillation and teacher, DeiT's distillation.
"""
