import sys

from dex.cli import main

sys.exit(main())
