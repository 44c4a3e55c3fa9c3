"""Building blocks of the detectors: backbone, neck, adapter, deformable attention and transformer, positions,
box coding, and (`tv_detection.py`) the torchvision detection components the package uses."""
