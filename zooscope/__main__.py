from zooscope.cli import run

run()
