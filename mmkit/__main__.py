"""`python -m mmkit` runs the command-line interface."""

from mmkit.cli.app import main

if __name__ == "__main__":
    main()
