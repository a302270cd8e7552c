import sys

from modelmake.cli import main

sys.exit(main())
