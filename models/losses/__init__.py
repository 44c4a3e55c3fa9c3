"""Losses that are more than a torchvision.ops call: the DETR set criterion."""
