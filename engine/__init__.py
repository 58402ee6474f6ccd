"""The shared train/infer engine behind the per-data-set scripts."""
