"""`python -m collect collect …`"""
import sys

from saeforge.cli import dispatch

sys.exit(dispatch(package="collect"))
