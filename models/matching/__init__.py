"""Which prediction learns from which box: the prior (anchor and point) generator, the assigners of the dense and
R-CNN heads, and the DETR's Hungarian matcher."""
