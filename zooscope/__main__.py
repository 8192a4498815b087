import sys

from zooscope.cli import main

sys.exit(main())
