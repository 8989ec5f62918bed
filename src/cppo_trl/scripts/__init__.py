"""Command-line tools: the training script (`cppo-train`, `python -m cppo_trl.cppo`), the offline demo and the
visualisers (`cppo-visualize`)."""
