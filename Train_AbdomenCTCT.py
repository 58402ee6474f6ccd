"""Train PLCReg on AbdomenCTCT (see README, "Data sets"). Usage: python Train_AbdomenCTCT.py --help"""
import sys

from engine.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("AbdomenCTCT"))
