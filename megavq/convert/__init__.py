"""Models in and out: Hugging Face import and export (hf/), sparse upcycling (upcycle.py), and the user-facing
`load_model` (load.py), which reads megavq and Hugging Face directories alike."""
