"""A run directory (`--out_dir`): what a run writes there, whether one is there, and run.json, the state that
outlives one attempt of the run (the wandb id, a non-finite step, how the last attempt ended)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from megavq.files import write_json
from megavq.store.manifest import MANIFEST, TOKENIZER_FILE

RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", "run.json", "wandb", "config.json", MANIFEST,
             TOKENIZER_FILE)
RUN_STATE = "run.json"


def holds_run(out_dir: Path) -> bool:
    """Whether out_dir holds a run that trained (a fresh run there would mix with it)."""
    return any((Path(out_dir) / name).exists() for name in ("checkpoints", "metrics.jsonl", "summary.json"))


def clear_run(out_dir: Path) -> None:
    """--overwrite: delete what a run wrote into out_dir (nothing else)."""
    for name in RUN_FILES:
        path = Path(out_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def read_run_state(out_dir: Path) -> dict:
    path = Path(out_dir) / RUN_STATE
    return json.loads(path.read_text()) if path.is_file() else {}


def update_run_state(out_dir: Path, **fields) -> dict:
    """run.json: what outlives one attempt of a run (wandb id, a non-finite step, how the last attempt ended)."""
    state = {**read_run_state(out_dir), **fields}
    write_json(Path(out_dir) / RUN_STATE, state)
    return state
