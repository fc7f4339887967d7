"""`python -m sae train|eval|export …`"""
import sys

from collect.cli import dispatch

sys.exit(dispatch(package="sae"))
