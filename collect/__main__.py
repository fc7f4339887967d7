"""`python -m collect collect …`"""
import sys

from collect.cli import dispatch

sys.exit(dispatch(package="collect"))
