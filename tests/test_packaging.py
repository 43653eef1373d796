"""Packaging: a wheel installed into a fresh virtual environment prepares the builtin data (with the shipped
tokenizer, package data), loads a saved model and finds the Hugging Face export's template and the
lm-evaluation-harness task (package data), run from outside the repository."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOT_SOURCES = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "runs", "wandb", ".whl",
                                     "tests")

INSTALLED_CHECK = """
import sys
from pathlib import Path

import torch

import megavq
from megavq.config import load_config
from megavq.data import TokenData, prepare_data
from megavq.store.model_dir import save_model
from megavq.model import Transformer

assert Path(megavq.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), megavq.__file__
data = TokenData(prepare_data("builtin", cache_dir="cache"))
cfg = load_config("tiny", [f"model.vocab_size={data.vocab_size}", "model.n_layers=2", "model.d_model=32",
                           "model.n_heads=2", "model.d_ff=64", "model.seq_len=16"])
torch.manual_seed(0)
model = Transformer(cfg).eval()
save_model(model.state_dict(), cfg, "model")
x_BS, _ = data.batch("val", step=0, batch_size=2, seq_len=16)
with torch.no_grad():
    assert torch.equal(megavq.load_model("model")(x_BS), model(x_BS))
from megavq.convert.hf.remote import MODEL_FILES, TEMPLATE, routers_source
from megavq.lm_eval_tasks import TASKS_DIR
assert all((TEMPLATE / name).is_file() for name in MODEL_FILES)  # package data: the Hugging Face export's template
assert "def build_router" in routers_source("vq")  # and the routers' source, copied from the installed modules
task = TASKS_DIR / "megavq_builtin_cloze"
assert {p.name for p in task.iterdir()} >= {"megavq_builtin_cloze.yaml", "megavq_builtin_cloze.jsonl", "utils.py"}
print("installed check ok:", megavq.__file__, data.vocab_size)
"""


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def fresh_venv(path: Path) -> Path:
    """A virtual environment that sees this interpreter's packages (torch, ...) but not its megavq."""
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", path)
    python = path / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    # --system-site-packages reaches the base interpreter's packages; when this interpreter is itself a virtual
    # environment, its packages come in through a .pth line, after the new environment's own site-packages.
    # (.pth files in that folder, such as an editable megavq install, are not processed.)
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "outer-env.pth").write_text("".join(f"{p}\n" for p in ours))
    return python


@pytest.mark.slow
def test_wheel_prepares_builtin_data_and_loads_a_model_outside_the_repo(tmp_path):
    src, wheels, outside = tmp_path / "src", tmp_path / "wheels", tmp_path / "outside"
    shutil.copytree(REPO, src, ignore=NOT_SOURCES)  # build from a copy: no build/ left in the repository
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, src)
    (wheel,) = wheels.glob("megavq-*.whl")
    python = fresh_venv(tmp_path / "venv")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel)
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MEGAVQ_CACHE")}
    proc = run(python, "-c", INSTALLED_CHECK, cwd=outside, env=dict(env, OMP_NUM_THREADS="1"))
    assert "installed check ok" in proc.stdout and str(tmp_path / "venv") in proc.stdout
