"""``python -m saslauthd_oidc`` runs the command line."""

import sys

from saslauthd_oidc.cli import main

sys.exit(main())
