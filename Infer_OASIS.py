"""Evaluate PLCReg on the OASIS test pairs (see README, "Data sets"). Usage: python Infer_OASIS.py --help"""
import sys

from engine.cli import infer_main

if __name__ == "__main__":
    sys.exit(infer_main("OASIS"))
