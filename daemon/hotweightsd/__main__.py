import sys

from hotweightsd.cli import main

sys.exit(main())
