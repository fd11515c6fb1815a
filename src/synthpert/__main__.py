"""`python -m synthpert <step>`: what the rules run, in whichever environment they get."""

import sys

from synthpert.cli import main

sys.exit(main())
