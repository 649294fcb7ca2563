"""``python -m softprompt_cli``: the same as the ``softprompt`` command."""

import sys

from softprompt_cli import main

sys.exit(main())
