"""``python -m llama2_align``: the library's commands (model-info, data, convert, eval, chat). The commands that run
flows (``run``) are added on the flows' layer: ``llama2-align`` or ``python -m flows.cli`` has them all."""

from .cli import main

if __name__ == "__main__":
    main()
