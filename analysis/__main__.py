"""`python -m analysis features|steer|lens|patch|… …`"""
import sys

from collect.cli import dispatch

sys.exit(dispatch(package="analysis"))
