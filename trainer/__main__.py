"""``python -m trainer``: casam-train as a module, which is how torchrun launches it.

    torchrun --standalone --nproc_per_node=2 -m trainer --bundle B --task T --data D …

takes the usual casam-train options; see ``trainer/distributed.py`` for what the ranks
share. Without torchrun it is plain casam-train.
"""

from trainer.cli import main

if __name__ == "__main__":
    main(prog_name="casam-train")
