import sys

from deepwish.cli import main

sys.exit(main())
