"""``python -m ambient_grpc_auth`` is the ``ambient-grpc-auth`` command."""

from __future__ import annotations

import sys

from ambient_grpc_auth.cli import main

sys.exit(main())
