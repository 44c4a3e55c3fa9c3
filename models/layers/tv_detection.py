"""The torchvision detection components this package builds on, imported in this one place.

Several live in torchvision's private modules (`_utils`; the backbone's IntermediateLayerGetter too) or are used
against their documented grain (a head's norm layer, a matcher swapped for ours), so a torchvision upgrade has
one file to check. None of our classes
takes one of these names: our anchors are `StrideAnchorGenerator`, our heads `*AuxHead`, our RPN
`ProposalNetwork`. torchvision.ops functions (box_iou, nms, the losses) are plain ops and are imported where used.
"""

from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, BoxLinearCoder
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

__all__ = [
    "FCOS",
    "BalancedPositiveNegativeSampler",
    "BoxCoder",
    "BoxLinearCoder",
    "ExtraFPNBlock",
    "FCOSClassificationHead",
    "FCOSHead",
    "FCOSRegressionHead",
    "FastRCNNPredictor",
    "FeaturePyramidNetwork",
    "GeneralizedRCNN",
    "GeneralizedRCNNTransform",
    "ImageList",
    "IntermediateLayerGetter",
    "LastLevelMaxPool",
    "LastLevelP6P7",
    "MultiScaleRoIAlign",
    "RPNHead",
    "RegionProposalNetwork",
    "RetinaNet",
    "RetinaNetHead",
    "RoIHeads",
    "TwoMLPHead",
    "concat_box_prediction_layers",
    "fastrcnn_loss",
]
