"""`python cli.py ...` from a checkout: the same command line as the installed `privbench`.

The commands live in privbench/cli.py so that installing puts them inside the privbench
package rather than a generic top-level `cli` module in site-packages.
"""

from privbench.cli.commands import main

if __name__ == "__main__":
    main()
