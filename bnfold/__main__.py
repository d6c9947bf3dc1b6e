from bnfold.cli import run

run()
