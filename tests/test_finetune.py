"""Fine-tuning: task data, metrics, and scripts/finetune.py through the real launchers (ranks, resume, refusals)."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from megavq.config import load_config
from megavq.data import Tokenizer
from megavq.data.task import TaskData
from megavq.errors import DataError
from megavq.model import Transformer
from megavq.store.model_dir import BUILTIN_TOKENIZER, save_model
from megavq.train.finetune import accuracy_f1
from megavq.train.launch import free_port

SMALL = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.seq_len=24",
         "model.vocab_size=4096", "moe.num_experts=4", "moe.top_k=2"]
RUN = ["data.micro_batch_size=4", "train.log_every=1", "train.eval_every=3", "train.warmup_steps=1", "train.lr=1e-3",
       "train.max_steps=6", "train.save_every=3"]


def write_task(path, n=40, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            label = rng.choice(["cat", "dog", "bird"])
            f.write(json.dumps({"text": f"the {label} " * rng.randint(1, 6) + "sat", "label": label}) + "\n")
    return path


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    """A tiny MoE model directory (the builtin tokenizer) and a three-class task."""
    root = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(0)
    model = Transformer(load_config("tiny", SMALL))
    save_model(model.to_canonical(model.state_dict()), model.cfg, root / "model", tokenizer=BUILTIN_TOKENIZER)
    return root / "model", write_task(root / "task.jsonl")


def finetune(args, launcher=("python",), check=True):
    if launcher[0] == "python":
        cmd = [sys.executable]
    else:
        cmd = [launcher[0], "--master_port", str(free_port()), *launcher[1:]]
    proc = subprocess.run([*cmd, "scripts/finetune.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "WANDB_MODE": "offline"})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_accuracy_and_macro_f1_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score
    gold, pred = torch.randint(0, 4, (50,)), torch.randint(0, 4, (50,))
    pred[:3] = 3  # class 3 predicted, perhaps never true
    acc, f1 = accuracy_f1(pred, gold, 5)  # class 4 absent from both: F1 0, as sklearn's labels=range(5)
    assert acc == pytest.approx(accuracy_score(gold, pred))
    assert f1 == pytest.approx(f1_score(gold, pred, average="macro", labels=range(5), zero_division=0))


def test_task_rows_split_pad_and_batch_by_step(task_files, tmp_path):
    _, data = task_files
    cfg = load_config("tiny", [*SMALL, "finetune.task=classify", f"finetune.data={data}"])
    task = TaskData.open(cfg, Tokenizer(BUILTIN_TOKENIZER), seed=1)
    assert (len(task), len(task.rows["val"]), task.classes) == (36, 4, ["bird", "cat", "dog"])
    assert TaskData.open(cfg, Tokenizer(BUILTIN_TOKENIZER), seed=1).rows == task.rows  # a seeded split
    x, y, real_BS = task.batch(5, 8, 1, slice(0, 8))
    halves = [task.batch(5, 8, 1, slice(i, i + 4)) for i in (0, 4)]
    assert torch.equal(y, torch.cat([h[1] for h in halves]))
    assert real_BS[:, 0].all() and (x[~real_BS] == 0).all() and real_BS.sum(1).max() == x.shape[1]
    epoch = [i for s in range(0, 9) for i in task.batch_rows(s, 4, 1, slice(0, 4))]
    assert sorted(epoch) == list(range(36))  # an epoch sees each row once
    lm = TaskData.open(load_config("tiny", [*SMALL, "finetune.task=lm", f"finetune.data={data}"]),
                       Tokenizer(BUILTIN_TOKENIZER), seed=1)
    x, y, real_BS = lm.batch(0, 4, 1, slice(0, 4))
    assert torch.equal(x[:, 1:][real_BS[:, 1:]], y[:, :-1][real_BS[:, 1:]]) and (y[~real_BS] == -1).all()


def test_missing_column_is_one_line(task_files):
    _, data = task_files
    cfg = load_config("tiny", [*SMALL, "finetune.task=classify", f"finetune.data={data}", "finetune.label_column=y"])
    with pytest.raises(DataError, match=r"has no column 'y' \(its columns: text, label\)"):
        TaskData.open(cfg, Tokenizer(BUILTIN_TOKENIZER), seed=1)


@pytest.mark.slow
def test_two_ranks_match_one_rank_and_resume_matches(task_files, tmp_path):
    """2 ranks x micro-batch 4 and 1 rank x 2 accumulation steps see the same rows (padded differently); a run
    stopped at step 3 and resumed ends where the uninterrupted one does."""
    model, data = task_files
    common = ["--ds_config", "ds_configs/zero2.json", "--checkpoint", str(model), "--task", "classify",
              "--data", str(data), *RUN, "finetune.trainable=no_router", "model.pool=mean"]
    finetune([*common, "--out_dir", str(tmp_path / "two")], launcher=("deepspeed", "--num_gpus", "2"))
    finetune([*common, "--out_dir", str(tmp_path / "one"), "train.grad_accum_steps=2"])
    two, one = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert max(abs(a["train/lm_loss"] - b["train/lm_loss"]) for a, b in zip(two, one)) < 1e-5, (two, one)
    assert abs(two[-1]["val/loss"] - one[-1]["val/loss"]) < 1e-5
    assert two[-1]["train/lm_loss"] < two[0]["train/lm_loss"]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert {"accuracy", "macro_f1"} <= set(summary) and {"val/accuracy", "val/macro_f1"} <= set(two[2])
    finetune([*common, "--out_dir", str(tmp_path / "part"), "train.grad_accum_steps=2", "train.stop_at_step=3"])
    finetune([*common, "--out_dir", str(tmp_path / "part"), "train.grad_accum_steps=2", "--resume"])
    part = metrics(tmp_path / "part")
    assert [m["step"] for m in part] == list(range(1, 7))
    assert abs(part[-1]["train/lm_loss"] - one[-1]["train/lm_loss"]) < 1e-6
    assert abs(part[-1]["val/loss"] - one[-1]["val/loss"]) < 1e-6
    proc = subprocess.run([sys.executable, "scripts/evaluate.py", "--checkpoint", str(tmp_path / "one"),
                           "--out", str(tmp_path / "eval")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # the task's validation rows, as recorded
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    final = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert report["accuracy"] == final["accuracy"] and report["macro_f1"] == final["macro_f1"], (report, final)
    assert abs(report["loss"] - final["val_loss"]) < 1e-5 and f"accuracy {final['accuracy']:.4f}" in proc.stdout


@pytest.mark.slow
def test_a_head_of_other_classes_is_refused_in_one_line(task_files, tmp_path):
    model, data = task_files
    torch.manual_seed(0)
    two_classes = Transformer(load_config("tiny", [*SMALL, "model.num_classes=2"]))
    save_model(two_classes.to_canonical(two_classes.state_dict()), two_classes.cfg, tmp_path / "head2",
               tokenizer=BUILTIN_TOKENIZER)
    proc = finetune(["--checkpoint", str(tmp_path / "head2"), "--task", "classify", "--data", str(data),
                     "--out_dir", str(tmp_path / "run"), *RUN], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"error: the classification head of {tmp_path / 'head2'} has 2 "
                                                    f"classes, {data} has 3")


def test_corpus_task_is_read_with_its_validation_split(tmp_path):
    """scripts/make_corpus_task.py over builtin and a folder of text; finetune reads the folder's two splits."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("kernel driver memory page table interrupt\n" * 200)
    proc = subprocess.run([sys.executable, "scripts/make_corpus_task.py", "--corpus", "builtin", "--corpus",
                           str(tmp_path / "docs"), "--out_dir", str(tmp_path / "task"), "--per_corpus", "20",
                           "--passage_chars", "100"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cfg = load_config("tiny", [*SMALL, "finetune.task=classify", f"finetune.data={tmp_path / 'task'}"])
    task = TaskData.open(cfg, Tokenizer(BUILTIN_TOKENIZER), seed=1)
    assert (len(task), len(task.rows["val"]), task.classes) == (32, 8, ["builtin", "docs"])
    val = [json.loads(line) for line in (tmp_path / "task" / "validation.jsonl").read_text().splitlines()]
    assert [y for _, y in task.rows["val"]] == [task.classes.index(r["label"]) for r in val]


@pytest.mark.parametrize("overrides, zero, message", [
    (["finetune.trainable=no_router"], 3, "which ZeRO stage 3 cannot checkpoint"),
    (["finetune.trainable=head", "moe.ep_size=2"], 2, "DeepSpeed's ZeRO stages 1-2 refuse for its MoE parameters"),
    (["finetune.trainable=no_experts", "moe.backend=deepspeed"], 1, "refuse for its MoE parameters"),
    (["moe.backend=deepspeed", "moe.ep_size=2"], 2, "fine-tune with moe.backend=native for moe.ep_size=2"),
    (["finetune.trainable=discrete_only"], 1, "the model's router is topk"),
    (["finetune.trainable=no_experts", "moe.every=0"], 1, "the model has none"),
])
def test_unsupported_combinations_are_refused_in_one_line(overrides, zero, message):
    from megavq.errors import ConfigError
    from megavq.train.finetune import check_combination
    cfg = load_config("tiny", [*SMALL, "finetune.task=classify", *overrides])
    with pytest.raises(ConfigError, match=message):
        check_combination(cfg, {"zero_optimization": {"stage": zero}})
    check_combination(load_config("tiny", SMALL), {"zero_optimization": {"stage": zero}})  # trainable=all
