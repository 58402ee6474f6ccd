"""Train PLCReg on OASIS (see README, "Data sets"). Usage: python Train_OASIS.py --help"""
import sys

from engine.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("OASIS"))
