"""The binarized collaborative encoder: its data, model and training loop."""
