"""lm-evaluation-harness tasks shipped with megavq: pass TASKS_DIR to `lm_eval --include_path`.

    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --tasks megavq_builtin_cloze \
        --include_path "$(python -c 'import megavq.lm_eval_tasks as t; print(t.TASKS_DIR)')"

megavq_builtin_cloze/: 300 four-way cloze items from the test split of the builtin corpus (megavq.eval.cloze).
"""
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
