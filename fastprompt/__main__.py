"""``python -m fastprompt`` (and ``torchrun ... -m fastprompt train ...``) runs the CLI."""

from fastprompt.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
