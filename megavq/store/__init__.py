"""What megavq writes and reads back: manifests and format versions (manifest.py), tensor shards (shards.py),
model and checkpoint directories (model_dir.py), run directories (run_dir.py), and the converters of older
formats (upgrade.py)."""
