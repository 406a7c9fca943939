import sys

from monoflow.cli import main

sys.exit(main())
