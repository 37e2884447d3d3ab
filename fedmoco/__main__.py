import sys

from fedmoco.cli import main

sys.exit(main())
