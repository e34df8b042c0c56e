from qtool.cli.commands import main

main()
