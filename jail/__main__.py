from jail.cli import run

run()
