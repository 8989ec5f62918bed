"""CPPO: Contrastive Perception Policy Optimization for Hugging Face TRL."""
