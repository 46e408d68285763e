"""``python -m llama2_align``: the same command line as ``llama2-align``."""

from .cli import main

if __name__ == "__main__":
    main()
