"""The task's data: the jsonl beside this file, whatever the working directory (no download, no cache)."""
import json
from pathlib import Path

DATA = Path(__file__).resolve().parent / "megavq_builtin_cloze.jsonl"


def load(**kwargs):
    """lm-evaluation-harness's custom_dataset: {"test": the items} (kwargs: the task's metadata, unused)."""
    import datasets
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
