import sys

from funnel.cli import main

sys.exit(main())
