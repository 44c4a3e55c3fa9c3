"""Detection models as plain `nn.Module`s, importing nothing from `stages/`.

- `meta_arch/`: the detectors: Deformable-DETR, Co-DETR, and torchvision's FCOS, RetinaNet and Faster R-CNN;
- `heads/`: Co-DETR's auxiliary heads and the Faster R-CNN parts both Faster R-CNNs are built from;
- `layers/`: backbone, neck, adapter, deformable attention and transformer, position encoding, box coding, and
  the torchvision detection components everything else uses (`layers/tv_detection.py`);
- `matching/`: the one prior generator, the one set of assigners, the Hungarian matcher;
- `losses/`: the DETR set criterion;
- `pretrain/`: AlignDet (box domain, with its detector protocol), MoCo v3 / BYOL, the crop classifier.

A bad constructor argument raises `models.errors.ModelConfigError`.
"""
