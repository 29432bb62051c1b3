"""python -m mmkernels.train --help"""
import sys

from mmkernels.train.cli import main

sys.exit(main())
