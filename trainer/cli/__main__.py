"""`python -m trainer.cli ARGS` is `segrec ARGS`."""

import sys

from trainer.cli.main import main

sys.exit(main())
