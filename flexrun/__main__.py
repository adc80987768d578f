from flexrun.cli import main

main()
