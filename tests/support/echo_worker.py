"""``ai-service worker echo`` with the registry plus the fake echo operation: a real worker
process for an operation that exists only as a spec (tests/test_registry.py)."""

import sys

from ai_service.cli import main
from ai_service.registry import OPERATIONS
from tests.support.echo_operation import ECHO

if __name__ == "__main__":
    sys.exit(main(["worker", "echo"], operations=OPERATIONS.plus(ECHO)))
