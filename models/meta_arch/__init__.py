"""Meta-architectures: one detector per file, each `forward(images, targets=None)` in torchvision's convention and
each speaking AlignDet's protocol (`models/pretrain/align_outputs.py`)."""
