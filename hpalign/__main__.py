"""`python -m hpalign <command> [flags]`, the same as the `hpalign` console script."""

from hpalign.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
