"""``python -m saslauthd_oidc`` runs the command line."""

import sys

from saslauthd_oidc.tools.cli import main

sys.exit(main())
