import sys

from passguard.cli import main

sys.exit(main())
