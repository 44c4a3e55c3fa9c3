"""Co-DETR auxiliary one-to-many heads (ATSS, Faster R-CNN, RetinaNet, FCOS) and their assigners."""

from models.heads.assigners import BACKGROUND, IGNORE, ATSSAssigner, FCOSAssigner, MaxIoUAssigner
from models.heads.atss import ATSSHead
from models.heads.base import AuxHead, AuxPositives
from models.heads.faster_rcnn import FasterRCNNHead
from models.heads.fcos import FCOSHead
from models.heads.retinanet import RetinaNetHead

__all__ = [
    "BACKGROUND",
    "IGNORE",
    "ATSSAssigner",
    "ATSSHead",
    "AuxHead",
    "AuxPositives",
    "FCOSAssigner",
    "FCOSHead",
    "FasterRCNNHead",
    "MaxIoUAssigner",
    "RetinaNetHead",
]
