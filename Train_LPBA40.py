"""Train PLCReg on LPBA40 (see README, "Data sets"). Usage: python Train_LPBA40.py --help"""
import sys

from engine.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("LPBA40"))
