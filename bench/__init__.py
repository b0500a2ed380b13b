"""jail's benchmark (not a test): `python bench/run.py`, see bench/README.md."""
