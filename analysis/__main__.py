"""`python -m analysis features|steer|lens|patch|… …`"""
import sys

from saeforge.cli import dispatch

sys.exit(dispatch(package="analysis"))
