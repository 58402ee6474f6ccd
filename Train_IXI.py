"""Train PLCReg on IXI (see README, "Data sets"). Usage: python Train_IXI.py --help"""
import sys

from engine.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("IXI"))
