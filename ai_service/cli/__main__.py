"""``python -m ai_service.cli``: the ``ai-service`` command without the console script."""

import sys

from ai_service.cli import main

sys.exit(main())
