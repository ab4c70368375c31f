import sys

from noodle.cli import main

sys.exit(main())
