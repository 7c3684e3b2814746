import sys

from soirlab.cli import main

sys.exit(main())
