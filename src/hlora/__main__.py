from hlora.cli.main import main

main()
