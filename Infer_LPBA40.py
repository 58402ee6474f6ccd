"""Evaluate PLCReg on the LPBA40 test pairs (see README, "Data sets"). Usage: python Infer_LPBA40.py --help"""
import sys

from engine.cli import infer_main

if __name__ == "__main__":
    sys.exit(infer_main("LPBA40"))
