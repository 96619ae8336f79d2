"""`python cli.py ...` from a checkout: the same command line as the installed `privbench`.

The commands live in privbench/cli/commands.py, inside the privbench package, so that installing
puts no generic top-level `cli` module into site-packages.
"""

from privbench.cli.commands import main

if __name__ == "__main__":
    main()
