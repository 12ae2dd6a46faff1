import sys

from lesionlab.cli.main import main

sys.exit(main())
