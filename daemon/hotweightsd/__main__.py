import sys

from hotweightsd.main import main

sys.exit(main())
