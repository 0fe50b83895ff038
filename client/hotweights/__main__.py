import sys

from hotweights.cli import main

sys.exit(main())
