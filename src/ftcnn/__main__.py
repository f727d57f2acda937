"""`python -m ftcnn` runs the command line."""

from ftcnn.cli import main

main()
