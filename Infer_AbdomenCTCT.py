"""Evaluate PLCReg on the AbdomenCTCT test pairs (see README, "Data sets"). Usage: python Infer_AbdomenCTCT.py --help"""
import sys

from engine.cli import infer_main

if __name__ == "__main__":
    sys.exit(infer_main("AbdomenCTCT"))
