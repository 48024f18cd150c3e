"""Engine: the one training loop (resume, checkpoints, DDP, autocast, lr schedule, step meter,
logs), COCO evaluation, data-parallel setup, the torch device and GPU leasing."""
