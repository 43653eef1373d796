"""The private APIs of DeepSpeed (deepspeed.py) and torch (torch.py) that megavq uses, each with its reason and the
versions it was tested with: the one place to look when a new release breaks one."""
