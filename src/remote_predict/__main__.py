import sys

from remote_predict.cli import main

sys.exit(main())
