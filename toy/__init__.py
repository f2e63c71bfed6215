"""The toy world of issue 9: scenes with exact labels (drawing, scenes, layouts) and the two small
teachers trained on them (teachers, quality), shipped in toy/weights in the official file layouts.
"""

import os

from toy.drawing import CLASSES  # the world's eight class names, also the merged model's vocabulary

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
# SAM's layout (sam_vit_b_01ec64.pth)
SAM_WEIGHTS = os.path.join(WEIGHTS, "toy_sam.pth")
# OpenCLIP's layout (open_clip_pytorch_model.bin)
CLIP_WEIGHTS = os.path.join(WEIGHTS, "toy_clip.bin")
__all__ = ["CLASSES", "WEIGHTS", "SAM_WEIGHTS", "CLIP_WEIGHTS"]
