"""The detector's state-dict key layout (torchvision's Faster R-CNN + FPN, which jdnas builds on):
the one place morphism, the supernet and the torchvision import read it from."""

BODY = "backbone.body."
FPN = "backbone.fpn."
FPN_INNER = "backbone.fpn.inner_blocks.{s}.0.weight"  # the lateral 1x1 conv reading stage s
RPN_CONV = "rpn.head.conv.0.0"
RPN_HEADS = ("rpn.head.cls_logits.weight", "rpn.head.bbox_pred.weight")
BOX = "roi_heads.box_head."
BOX_FC6 = "roi_heads.box_head.fc6.weight"
PREDICTOR = ("roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.bbox_pred.weight")
