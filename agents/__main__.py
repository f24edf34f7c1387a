"""`python -m agents train [--task NAME] [--model NAME] ...`: see `agents._cli`."""

import sys

from ._cli import main

sys.exit(main())
