"""Evaluate PLCReg on the IXI test pairs (see README, "Data sets"). Usage: python Infer_IXI.py --help"""
import sys

from engine.cli import infer_main

if __name__ == "__main__":
    sys.exit(infer_main("IXI"))
