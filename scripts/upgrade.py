"""Rewrite a megavq run, checkpoint or model directory of an older format in the current one (in place).

    python scripts/upgrade.py DIR [DIR ...]

megavq reads the current format and the previous one; older directories are refused with this command.
Checkpoints of format 0 and 1 (model.safetensors + train_state.*, beside DeepSpeed's pickled files) become
sharded format-2 checkpoints (the DeepSpeed files are deleted), so that the run resumes. See megavq/store/manifest.py.
"""
import argparse

from megavq.train.launch import user_errors


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", help="run, checkpoint or model directories")
    args = p.parse_args()
    with user_errors():
        from megavq.store.upgrade import upgrade
        for d in args.dirs:
            for done in upgrade(d):
                print(f"upgraded {done}")


if __name__ == "__main__":
    main()
