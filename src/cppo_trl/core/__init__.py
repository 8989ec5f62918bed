"""Pure tensor and image code: the perception maths, the perturbations, PAPO's mask, image normalisation and the pixel
budget. Nothing here imports TRL or knows of a trainer, so each piece is tested on its own against hand-computed values."""
