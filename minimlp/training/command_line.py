"""The argument parser of every minimlp command (train.py, predict.py, python -m minimlp.training.plot/analyze):
a bad flag is one line on stderr that names it, and exit code 2.

argparse's own parser prints its whole usage first (tens of lines for train.py) and the error last,
where it scrolls out of sight in a job log; this one prints the error alone, with where to read more.
"""
import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)
