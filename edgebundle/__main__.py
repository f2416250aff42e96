from edgebundle.cli import main

main()
