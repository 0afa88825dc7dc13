import sys

from lipforcing.cli import main

sys.exit(main())
