"""python -m fineweb_gpt.doctor: the same as the fineweb-gpt-doctor command."""

import sys

from fineweb_gpt.doctor.cli import main

sys.exit(main())
