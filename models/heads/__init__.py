"""Co-DETR's auxiliary one-to-many heads (ATSS, Faster R-CNN, RetinaNet, FCOS) and the Faster R-CNN parts
(`rcnn.py`) the standalone Faster R-CNN shares with them. Their priors and assigners live in models/matching/."""

from models.heads.atss import ATSSAuxHead
from models.heads.base import AuxHead, AuxPositives
from models.heads.faster_rcnn import FasterRCNNAuxHead
from models.heads.fcos import FCOSAuxHead
from models.heads.retinanet import RetinaNetAuxHead

__all__ = ["ATSSAuxHead", "AuxHead", "AuxPositives", "FCOSAuxHead", "FasterRCNNAuxHead", "RetinaNetAuxHead"]
