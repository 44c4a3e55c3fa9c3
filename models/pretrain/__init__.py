"""Pre-training wrappers: AlignDet (box domain, around any detector speaking `align_outputs.AlignableDetector`),
MoCo v3 / BYOL (image domain) and the supervised crop classifier."""
