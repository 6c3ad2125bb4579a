"""Your own images, end to end (run: python -m experiments.own_images)."""
