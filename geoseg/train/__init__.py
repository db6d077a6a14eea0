"""Training, evaluation and export of segmentation models."""
