"""`python -m unlearnd.cli`: the same command line as the `unlearnd` script."""

from unlearnd.cli import main

if __name__ == "__main__":
    main()
