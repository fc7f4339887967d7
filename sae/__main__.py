"""`python -m sae train|eval|export …`"""
import sys

from saeforge.cli import dispatch

sys.exit(dispatch(package="sae"))
