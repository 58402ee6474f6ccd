"""Train PLCReg on SRReg (see README, "Data sets"). Usage: python Train_SRReg.py --help"""
import sys

from engine.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("SRReg"))
