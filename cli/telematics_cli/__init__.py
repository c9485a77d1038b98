"""``telematics-reg``: the operators' command-line tool of the telematics registration service.

Loads registration files onto the queue (validated, batched, resumable), reports the service's state, shows a
user, prints a valid access token, and lists or redrives dead letters. Resources are found from the deployed
CloudFormation stack (``--stack``) or from the local stack that ``make run`` saves in ``.local-stack/stack.json``.
"""

from __future__ import annotations

__all__ = ["EXIT_DATA", "EXIT_OK", "EXIT_USAGE", "main"]

from telematics_cli.app import main
from telematics_cli.errors import EXIT_DATA, EXIT_OK, EXIT_USAGE
