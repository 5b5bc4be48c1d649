"""One training loop per loop shape; each runs on its own with `python -m posttrain.recipes.<name>`."""
