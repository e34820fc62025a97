"""``python -m casam_label``: the casam-label command."""

from casam_label.cli import main

if __name__ == "__main__":
    main()
