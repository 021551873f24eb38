from llmexp.cli.main import main

main()
