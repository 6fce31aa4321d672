"""``python -m fastprompt`` (and ``torchrun ... -m fastprompt train ...``) runs the CLI."""

from fastprompt.cli import main

raise SystemExit(main())
