import sys

from pairopt.cli import main

sys.exit(main())
